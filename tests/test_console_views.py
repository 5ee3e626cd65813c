"""The console's data and pages without a browser: the pipeline feed's arithmetic, the user and item
views over the real batch logic (real encoders, embedded store), and the pages' escaping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streams.console import pages
from streams.console.explorer import Explorer, ItemView, UserView
from streams.console.feed import PipelineFeed
from streams.metrics import WorkerMetrics
from streams.pipeline import IncomingMessage, WindowLimits
from streams.pseudonym import Pseudonyms
from streams.records import ControlCommand, DeadLetter, Event, encode_control, encode_event
from streams.settings import Secret
from streams.state import WindowEntry
from tests.harness import Processors, processors

START_MS = 1_700_000_000_000
LIMITS = WindowLimits(max_events=4, horizon_ms=3_600_000, dedup_capacity=20)


def test_the_feed_turns_counters_into_rates_and_latencies_into_percentiles() -> None:
    metrics, now = WorkerMetrics(), [1000.0]
    feed = PipelineFeed(metrics, clock=lambda: now[0])
    now[0] += 2
    metrics.batch_events.observe(30)
    metrics.batch_events.observe(10)
    metrics.recommendations.inc(20)
    metrics.dead_letters.labels("events", "ts").inc(4)
    metrics.dead_letters.labels("control", "record").inc(2)
    metrics.lists_sent([now[0] - 0.010] * 98 + [now[0] - 0.500] * 2, now[0])
    metrics.consumer_lag.labels("rec.events", "3").set(17)
    sample = feed.sample()
    assert (sample.events_per_s, sample.lists_per_s, sample.dead_letters_per_s) == (20, 10, 3)
    assert sample.batch_mean == 20 and sample.p50_ms == 10.0 and 10 < (sample.p99_ms or 0) <= 500
    now[0] += 1
    idle = feed.sample()
    assert (idle.events_per_s, idle.batch_mean) == (0, None)
    snapshot = feed.snapshot()
    assert snapshot["totals"] == {"events": 40, "lists": 20, "dead_letters": 6}
    assert snapshot["dead_letters_by_reason"] == {"events: field 'ts'": 4, "control: the message as a whole": 2}
    assert snapshot["lag"] == {"rec.events [3]": 17} and len(snapshot["series"]["at"]) == 2
    now[0] += 400  # past the kept span: no latency to tell
    assert feed.snapshot()["latency"]["p99_ms"] is None


@pytest.fixture(scope="module")
def parts(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Processors]:
    home = tmp_path_factory.mktemp("console-views")
    key = Secret("console")
    return {p: processors(home / str(p), models_dir, LIMITS, 16, key if p else None) for p in (False, True)}


def _drive(parts: Processors, table: dict[bytes, bytes], state_key: str, messages: list[IncomingMessage]) -> None:
    user = messages[0].key.decode() if messages[0].key else ""
    outcome = parts.events.process(messages, {user: table.get(state_key.encode())})
    if user in outcome.windows:
        table[state_key.encode()] = outcome.windows[user]


def _events(parts: Processors, user: str, n: int) -> list[IncomingMessage]:
    events = [Event(f"{user}-e{i}", user, parts.items[i].item_id, "click", START_MS + i * 1000) for i in range(n)]
    return [IncomingMessage(user.encode(), encode_event(e), "rec.events", 0, i) for i, e in enumerate(events)]


@pytest.mark.parametrize("pseudonymised", [False, True])
def test_a_users_view_holds_their_window_evictions_list_reasons_and_changes(
    parts: dict[bool, Processors], pseudonymised: bool
) -> None:
    used = parts[pseudonymised]
    pseudonyms = Pseudonyms(Secret("console") if pseudonymised else None)
    table: dict[bytes, bytes] = {}
    user = "u-view"
    for message in _events(used, user, 6):  # one at a time: each event its own refresh
        _drive(used, table, pseudonyms.of(user), [message])
    explorer = Explorer(pseudonyms.of, used.events, k=5)
    view = explorer.user(user, table.get(explorer.window_key(user)))
    assert not view.problem
    assert view.state_key == (pseudonyms.of(user) if pseudonymised else None)
    assert [e.item_id for e in view.entries] == [i.item_id for i in used.items[5:1:-1]]  # newest first
    assert [e.item_id for e in view.evicted] == [i.item_id for i in used.items[1::-1]]
    window_items = {e.item_id for e in view.entries}
    assert len(view.items) == 5 and not {i.item_id for i in view.items} & window_items
    for item in view.items:
        assert item.explained_by and set(item.explained_by) <= window_items and item.interest is None
        assert item.reason.startswith("because you clicked ") and item.explained_by[0] not in item.reason
    assert len(view.changes) == 3  # the window can go back to 4 events: 3 steps between their lists
    assert [c.event.item_id for c in view.changes] == [i.item_id for i in used.items[5:2:-1]]
    assert all(len(c.entered) == len(c.left) for c in view.changes)  # a full list stays full
    assert {i.item_id for i in view.items} <= view.catalog.keys() and window_items <= view.catalog.keys()
    html = pages.user_page(view, "m1", user)
    assert all(pages.escape(i.reason) in html for i in view.items)
    assert ("pseudonymised" in html) == pseudonymised


def test_a_user_with_nothing_to_show_says_why(parts: dict[bool, Processors]) -> None:
    used = parts[False]
    table: dict[bytes, bytes] = {}
    explorer = Explorer(lambda u: u, used.events, k=5)
    assert "never seen" in explorer.user("nobody", None).problem
    _drive(used, table, "u-gone", _events(used, "u-gone", 2))
    forget = ControlCommand("forget_user", "u-gone", START_MS + 10_000)
    _drive(used, table, "u-gone", [IncomingMessage(b"u-gone", encode_control(forget), "rec.control", 0, 9)])
    view = explorer.user("u-gone", table[b"u-gone"])
    assert view.problem == "the user was forgotten" and not view.entries and not view.items
    assert "unreadable" in explorer.user("u-broken", b"\x00garbage").problem


def test_an_items_view_holds_its_catalogue_entry_and_nearest_items(parts: dict[bool, Processors]) -> None:
    used = parts[False]
    explorer = Explorer(lambda u: u, used.events, k=5)
    first = used.items[0]
    view = explorer.item(first.item_id)
    assert view.payload is not None and view.payload["title"] == first.title
    neighbours = [item_id for item_id, _, _ in view.neighbours]
    assert len(neighbours) == 10 and first.item_id not in neighbours
    scores = [score for _, score, _ in view.neighbours]
    assert scores == sorted(scores, reverse=True)
    assert explorer.item("no-such-item").payload is None


def test_pages_escape_what_users_and_the_catalogue_wrote() -> None:
    hostile = "<script>alert(1)</script>"
    entry = WindowEntry(START_MS, "e1", hostile, "click")
    view = UserView(hostile, None, entries=[entry], catalog={hostile: {"title": hostile, "category": hostile}})
    letter = DeadLetter(hostile, 0, 1, hostile, None, None, START_MS)
    for html in (
        pages.user_page(view, hostile, hostile),
        pages.item_page(ItemView(hostile, {"title": hostile, "tags": [hostile], "ts": START_MS}), hostile, hostile),
        pages.dead_letters_page([letter], {hostile: 1}, hostile),
        pages.forgotten_page(hostile, hostile),
    ):
        assert hostile not in html and "&lt;script&gt;" in html


class TwoInterests:
    """The real user tower's vector, and a second interest pointing at one fixed item: a stand-in for a
    multi-interest bundle (training one costs minutes; the explorer only reads the vectors it gives)."""

    def __init__(self, tower: Any, second: np.ndarray) -> None:
        self.tower, self.second, self.interests = tower, second, 2

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tower, name)

    def encode_batch(self, inputs: Any) -> np.ndarray:
        first = self.tower.encode_batch(inputs)
        scale = np.linalg.norm(first, axis=1, keepdims=True) / np.linalg.norm(self.second)
        return np.stack([first, np.broadcast_to(self.second, first.shape) * scale], axis=1)


def test_a_multi_interest_users_items_say_which_interest_they_came_from(parts: dict[bool, Processors]) -> None:
    used = parts[False]
    recommender = used.events.recommender
    user, table = "u-two", {}
    _drive(used, table, user, _events(used, user, 3))  # the user's window: items 0, 1 and 2
    far = max(used.items[3:], key=lambda i: i.category != used.items[0].category).item_id
    single = recommender.encoder
    recommender.encoder = TwoInterests(single, recommender.item_vectors([far])[far])  # type: ignore[assignment]
    try:
        view = Explorer(lambda u: u, used.events, k=8).user(user, table[user.encode()])
    finally:
        recommender.encoder = single
    assert view.interests == 2 and {i.interest for i in view.items} == {0, 1}, view.items
    assert next(i for i in view.items if i.item_id == far).interest == 1  # the second interest's own item
    html = pages.user_page(view, "m1", user)
    assert "2 interests" in html and "<th>interest</th>" in html
