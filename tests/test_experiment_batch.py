"""A running experiment in the event micro-batch step, with the real encoders and embedded Qdrant (no
broker): lists stamped by variant, credit for what follows them, replays and forget-user."""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from encoder.config import INTEREST_BUNDLE
from streams.console.explorer import Explorer
from streams.console.pages import user_page
from streams.experiments.assignment import variant_of
from streams.experiments.attribution import ExperimentCounts, UserExposure
from streams.experiments.config import ExperimentConfig, VariantConfig
from streams.experiments.serving import CountsUpdate, ModelLists, PopularLists, RunningExperiment, VariantLists
from streams.pipeline import EventBatchProcessor, IncomingMessage, WindowLimits
from streams.recommend import RefreshRequest
from streams.records import ControlCommand, Event, encode_control, encode_event
from streams.rerank import RerankPolicy
from streams.settings import Settings
from streams.state import UserWindow
from streams.trending import POPULAR_REASON
from streams.worker.app import load_model
from streams.worker.experiment_loader import ExperimentLoader
from tests.harness import processors

LIMITS = WindowLimits(10, 10**12, 100)
T0 = 1_700_000_000_000


def _running(events: EventBatchProcessor, interleave: bool = False) -> RunningExperiment:
    served = events.recommender
    config = ExperimentConfig(
        "exp", (VariantConfig("model", 50), VariantConfig("popular", 50, baseline="trending")), interleave=interleave
    )
    variants: dict[str, VariantLists] = {
        "model": ModelLists(served, RerankPolicy()),
        "popular": PopularLists(events.trending, served),
    }
    return RunningExperiment(config, variants, events.metrics, served.top_k)


def _messages(events: list[Event], first_offset: int = 0) -> list[IncomingMessage]:
    return [
        IncomingMessage(e.user_id.encode(), encode_event(e), "events", 0, first_offset + n)
        for n, e in enumerate(events)
    ]


def _apply(table: dict[bytes, bytes], updates: list[CountsUpdate]) -> None:
    for update in updates:
        table[update.key] = update.applied_to(table.get(update.key))


def _users_in(table: dict[bytes, bytes]) -> dict[str, float]:
    users: dict[str, float] = {}
    for raw in table.values():
        for name, stats in ExperimentCounts.from_bytes(raw).variants.items():
            users[name] = users.get(name, 0.0) + float(stats[0])
    return users


def test_each_user_gets_their_variants_list_and_a_click_on_it_is_credited(tmp_path: Path, models_dir: Path) -> None:
    parts = processors(tmp_path, models_dir, LIMITS)
    events, items = parts.events, [i.item_id for i in parts.items]
    events.experiment = running = _running(events)
    users = [f"user-{n}" for n in range(12)]
    table: dict[bytes, bytes] = {}
    first = [Event(f"{u}-0", u, items[n % 5], "view", T0 + n) for n, u in enumerate(users)]
    outcome = events.process(_messages(first), {})
    _apply(table, outcome.experiment_counts)
    assert {r.user_id for r in outcome.recommendations} == set(users)
    for rec in outcome.recommendations:
        assert rec.experiment == "exp" and rec.variant == variant_of(running.config, rec.user_id).name
        if rec.variant == "popular":
            assert rec.model == "trending" and all(i.reason == POPULAR_REASON for i in rec.items)
        else:
            assert rec.model == events.recommender.encoder.version and rec.items[0].reason.startswith("because you")
        assert first[users.index(rec.user_id)].item_id not in {i.item_id for i in rec.items}
    assert {v.name for v in running.config.variants} == {r.variant for r in outcome.recommendations}

    # Each user clicks the third item of their list: a hit at rank 3, for their variant.
    lists = {rec.user_id: rec for rec in outcome.recommendations}
    clicks = [Event(f"{u}-1", u, lists[u].items[2].item_id, "click", T0 + 60_000 + n) for n, u in enumerate(users)]
    stored = dict(outcome.windows)
    second = events.process(_messages(clicks, 100), stored)
    _apply(table, second.experiment_counts)
    for user in users:
        exposure = UserExposure.from_bytes(UserWindow.from_bytes(second.windows[user], 10, 10**12, 100).experiment)
        assert exposure.variant == variant_of(running.config, user).name
        assert exposure.totals == [2, 1, 1, 0, 1, 1 / 3]
    assert sum(_users_in(table).values()) == len(users)
    stored |= second.windows

    # The console shows a user's variant, their totals and the list their variant makes.
    popular = next(u for u in users if variant_of(running.config, u).name == "popular")
    view = Explorer(lambda u: u, events, 5).user(popular, stored[popular])
    assert view.experiment == "exp: popular" and view.experiment_totals["hits"] == 1
    assert view.items and all(i.reason == POPULAR_REASON for i in view.items)
    assert "in experiment <b>exp: popular</b>: 2 lists received, 1 engagements, 1 credited" in user_page(
        view, "m", popular
    )

    # A redelivery of the clicks (a crash before the commit) changes no count and no state.
    replay = events.process(_messages(clicks, 100), stored)
    assert not replay.experiment_counts and not replay.windows.keys() - stored.keys()
    assert all(replay.windows[u] == stored[u] for u in replay.windows)

    # Forgetting a user takes them out of the counts, and their state goes with the window.
    gone = users[0]
    command = ControlCommand("forget_user", gone, T0 + 120_000)
    forgot = events.process([IncomingMessage(gone.encode(), encode_control(command), "rec.control", 0, 500)], stored)
    _apply(table, forgot.experiment_counts)
    assert sum(_users_in(table).values()) == len(users) - 1
    assert UserWindow.from_bytes(forgot.windows[gone], 10, 10**12, 100).experiment == b""


def test_interleaved_lists_draft_both_variants_and_credit_the_team(tmp_path: Path, models_dir: Path) -> None:
    parts = processors(tmp_path, models_dir, LIMITS)
    events, items = parts.events, [i.item_id for i in parts.items]
    events.experiment = _running(events, interleave=True)
    users = [f"user-{n}" for n in range(6)]
    outcome = events.process(_messages([Event(f"{u}-0", u, items[n], "view", T0) for n, u in enumerate(users)]), {})
    for rec in outcome.recommendations:
        assert rec.variant == "model+popular" and rec.model == f"{events.recommender.encoder.version}+trending"
        teams = [i.team for i in rec.items]
        assert set(teams) <= {"model", "popular"} and abs(teams.count("model") - teams.count("popular")) <= 1
        assert len({i.item_id for i in rec.items}) == len(rec.items) == events.recommender.top_k
    rec = outcome.recommendations[0]
    picked = next(i for i in rec.items if i.team == "popular")
    click = Event("c", rec.user_id, picked.item_id, "click", T0 + 1_000)
    credited = events.process(_messages([click], 50), dict(outcome.windows))
    window = UserWindow.from_bytes(credited.windows[rec.user_id], 10, 10**12, 100)
    assert UserExposure.from_bytes(window.experiment).team_credits == [0, 1]
    (update,) = credited.experiment_counts
    assert np.array_equal(update.delta.preferences, [0, 1, 0])


def test_a_changed_experiment_file_is_swapped_in_and_a_bad_one_leaves_the_running_one(
    tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = processors(tmp_path, models_dir, LIMITS)
    events, items = parts.events, [i.item_id for i in parts.items]
    path = tmp_path / "experiment.toml"
    variants = '[[variant]]\nname = "a"\nshare = {a}\n[[variant]]\nname = "b"\nshare = {b}\nmodel = "{model}"\n'
    path.write_text('name = "live"\n' + variants.format(a=1, b=0, model=models_dir))
    text_embedder = parts.catalog.current.embedder.text_embedder
    settings = Settings(home=tmp_path, model_dir=str(models_dir), experiments=str(path))
    workers = {"event_worker": ThreadPoolExecutor(1), "catalog_worker": ThreadPoolExecutor(1)}
    store = events.recommender.store
    loader = ExperimentLoader(settings, store, text_embedder, events, parts.catalog, load_model, **workers)
    loader.start()  # "b" serves its own copy of the bundle: the served item tower, so the served collection

    def variants_served(first_event: int) -> set[str | None]:
        batch = [Event(f"e{first_event + n}", f"user-{n}", items[n], "view", T0 + first_event) for n in range(8)]
        return {rec.variant for rec in events.process(_messages(batch, first_event), {}).recommendations}

    assert variants_served(0) == {"a"} and loader.check() is None  # unchanged: nothing to do
    assert parts.catalog.variant_targets == [parts.catalog.current]
    path.write_text('name = "live"\n' + variants.format(a=0, b=1, model=models_dir))
    assert loader.check() is not None and variants_served(100) == {"b"}
    path.write_text('name = "live"\n[[variant]]\nname = "only"\n')
    with caplog.at_level(logging.ERROR):
        assert loader.check() is None
    assert "at least two [[variant]]" in caplog.text and variants_served(200) == {"b"}

    # A model the worker has not loaded yet is loaded live; the one no variant names any more is let go.
    other = tmp_path / "other-model"
    shutil.copytree(models_dir / INTEREST_BUNDLE, other / INTEREST_BUNDLE)
    path.write_text('name = "live"\n' + variants.format(a=1, b=1, model=other))
    assert loader.check() is not None and variants_served(300) == {"a", "b"}
    assert list(loader.models) == [other] and len(parts.catalog.variant_targets) == 1


@pytest.mark.parametrize("kind", ["model", "popular"])
def test_every_variant_lists_maker_keeps_the_contract(tmp_path: Path, models_dir: Path, kind: str) -> None:
    """Whatever makes a variant's lists: one list per request, answering its trigger, at most k items, none
    of them already in the window or repeated; the same for one user now, and nothing for an
    empty window."""
    parts = processors(tmp_path, models_dir, LIMITS)
    events, items = parts.events, [i.item_id for i in parts.items]
    warm = events.process(_messages([Event(f"w{n}", f"w{n}", items[n], "view", T0) for n in range(10)]), {})
    assert warm.recommendations  # the trending counts now hold the items seen
    makers = {
        "model": ModelLists(events.recommender, RerankPolicy()),
        "popular": PopularLists(events.trending, events.recommender),
    }
    maker: VariantLists = makers[kind]
    windows = {}
    for n in range(4):
        window = LIMITS.new_window()
        for step in range(3):
            window.add(Event(f"u{n}-{step}", f"u{n}", items[n + step], "click", T0 + step))
        windows[f"u{n}"] = window
    requests = [
        RefreshRequest(user, window, Event(f"{user}-2", user, window.item_ids[-1], "click", T0 + 2), (f"{user}-2",))
        for user, window in windows.items()
    ]
    lists = maker.lists(requests, events.recommender.item_vectors(items))
    assert sorted(r.user_id for r in lists) == sorted(windows)
    for rec in lists:
        shown = [i.item_id for i in rec.items]
        assert rec.trigger_event_id == f"{rec.user_id}-2" and 0 < len(shown) <= events.recommender.top_k
        assert len(set(shown)) == len(shown) and not set(shown) & set(windows[rec.user_id].item_ids)
    now = maker.current("u0", windows["u0"], 3, None)
    assert (
        now is not None and 0 < len(now.items) <= 3 and not {i.item_id for i in now.items} & set(windows["u0"].item_ids)
    )
    assert maker.current("nobody", LIMITS.new_window(), 3, None) is None
