"""Co-occurrence fused into the stream's lists (streams.recommend with streams.fusion), with the real ONNX
encoders and embedded Qdrant, no broker: what people reach next after an item rises in the lists of whoever
touches it, named by that item, and every rule of a list still holds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from streams.cooccurrence import PartitionedCooccurrence
from streams.fusion import Fusion
from streams.pipeline import IncomingMessage, WindowLimits
from streams.ports import ItemFilter
from streams.records import Event, Recommendation, encode_event, encode_item
from streams.state import event_digest
from tests.harness import Processors, processors

START = 1_700_000_000_000


class FusingEncoder:
    """The real user tower, with the fusion a bundle would carry (training one that chose it costs minutes)."""

    def __init__(self, tower: Any, fusion: Fusion) -> None:
        self.tower, self.fusion = tower, fusion

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tower, name)


@pytest.fixture
def parts(tmp_path: Path, models_dir: Path) -> Processors:
    counted = PartitionedCooccurrence()
    used = processors(tmp_path, models_dir, WindowLimits(20, 10**12, 100), n_items=20, cooccurrence=counted)
    recommender = used.events.recommender
    recommender.encoder = FusingEncoder(recommender.encoder, Fusion(weight=3.0, floor=0.01))  # type: ignore[assignment]
    return used


def _send(used: Processors, events: list[Event], stored: dict[str, bytes]) -> list[Recommendation]:
    messages = [IncomingMessage(e.user_id.encode(), encode_event(e), "events", 0, n) for n, e in enumerate(events)]
    outcome = used.events.process(messages, {u: stored.get(u) for u in {e.user_id for e in events}})
    stored.update(outcome.windows)
    assert not outcome.dead_letters, outcome.dead_letters
    return outcome.recommendations


def _crowd(used: Processors, first: str, then: str, stored: dict[str, bytes], n: int = 30, name: str = "crowd") -> None:
    """``n`` users who touch ``first`` and go on to ``then``."""
    _send(
        used,
        [
            Event(f"{name}{n}-{step}", f"{name}-{n}", item, "view", START + 1000 * step)
            for n in range(n)
            for step, item in enumerate((first, then))
        ],
        stored,
    )


def _least_likely_next(used: Processors, after: str, stored: dict[str, bytes]) -> str:
    """The item the encoder alone ranks lowest for a user who touched ``after``."""
    used.events.recommender.cooccurrence = None
    try:
        plain = used.events.recommender.current("probe", _window(used, after, stored), k=19)
    finally:
        used.events.recommender.cooccurrence = used.events.cooccurrence
    assert plain is not None
    return plain.items[-1].item_id


def _window(used: Processors, item: str, stored: dict[str, bytes]) -> Any:
    _send(used, [Event("probe-1", "probe", item, "view", START)], stored)
    return used.events.window_limits.load(stored["probe"])


def _crowded(used: Processors) -> tuple[dict[str, bytes], Any, str]:
    """Stored windows after a crowd went from the first item to the one the encoder alone ranks last."""
    stored: dict[str, bytes] = {}
    first = used.items[0]
    then = _least_likely_next(used, first.item_id, stored)
    _crowd(used, first.item_id, then, stored)
    return stored, first, then


def test_what_people_reach_next_rises_named_by_the_item_it_follows(parts: Processors) -> None:
    stored, first, then = _crowded(parts)
    (fresh,) = _send(parts, [Event("n1", "newcomer", first.item_id, "view", START + 10_000)], stored)
    assert fresh.items[0].item_id == then
    assert fresh.items[0].explained_by == (first.item_id,) and first.title in fresh.items[0].reason
    # Once it is in the window, it is never recommended; its own neighbours take over.
    (after,) = _send(parts, [Event("n2", "newcomer", then, "view", START + 20_000)], stored)
    assert then not in {i.item_id for i in after.items} and first.item_id not in {i.item_id for i in after.items}


def test_the_stream_scores_co_occurrence_with_the_bundles_damping(parts: Processors) -> None:
    """What follows an item for 40 users but follows others as often ranks above what follows it for 8
    users and nothing else; damped, the rarely seen one goes first (``streams.cooccurrence``)."""
    stored: dict[str, bytes] = {}
    first, other, popular, rare = (item.item_id for item in parts.items[:4])
    _crowd(parts, first, popular, stored, n=40, name="a")
    _crowd(parts, other, popular, stored, n=40, name="b")
    _crowd(parts, first, rare, stored, n=8, name="c")
    tops = {}
    for damping in (0.0, 0.5):
        parts.events.recommender.encoder.fusion = Fusion(weight=30.0, floor=0.01, damping=damping)
        (listed,) = _send(parts, [Event(f"p{damping}", f"probe{damping}", first, "view", START + 10_000)], stored)
        tops[damping] = [item.item_id for item in listed.items[:2]]
    assert tops == {0.0: [popular, rare], 0.5: [rare, popular]}


def test_a_redelivered_event_gets_the_list_it_got_first_though_the_counts_moved_on(parts: Processors) -> None:
    stored, first, then = _crowded(parts)
    batch = [Event("r1", "replayer", first.item_id, "view", START + 10_000)]
    (original,) = _send(parts, batch, stored)
    assert original.items[0].item_id == then
    other = next(i.item_id for i in parts.items[1:] if i.item_id != then)
    _crowd(parts, first.item_id, other, stored, n=200, name="later")  # now most go on to another item
    (again,) = _send(parts, batch, stored)  # redelivered after a crash: a duplicate in the stored window
    assert again.items == original.items and again.trigger_event_id == "r1"
    (fresh,) = _send(parts, [Event("f1", "fresh", first.item_id, "view", START + 10_000)], stored)
    assert fresh.items[0].item_id == other  # while a new event's list follows the counts as they are


def test_a_replay_of_a_list_before_the_last_eight_gets_the_list_it_got_first(parts: Processors) -> None:
    """A worker killed seconds after its last commit replays every list of those seconds; windows keep
    their candidates until the commit (eight lists used to be kept, fewer than a busy user gets)."""
    stored, first, then = _crowded(parts)
    lists = [
        _send(parts, [Event(f"b{n}", "busy", item.item_id, "view", START + 10_000 + n)], stored)[0]
        for n, item in enumerate([first, *parts.items[5:17]])
    ]
    other = next(i.item_id for i in parts.items[1:] if i.item_id != then)
    _crowd(parts, first.item_id, other, stored, n=200, name="later")  # the counts move on
    (again,) = _send(parts, [Event("b0", "busy", first.item_id, "view", START + 10_000)], stored)
    assert again.trigger_event_id == "b0" and again.items == lists[0].items
    assert lists[0].items[0].item_id == then


def test_a_replay_whose_stored_candidates_are_unreadable_is_ranked_with_the_counts_now(
    parts: Processors, caplog: pytest.LogCaptureFixture
) -> None:
    stored, first, then = _crowded(parts)
    batch = [Event("r1", "replayer", first.item_id, "view", START + 10_000)]
    _send(parts, batch, stored)
    other = next(i.item_id for i in parts.items[1:] if i.item_id != then)
    _crowd(parts, first.item_id, other, stored, n=200, name="later")
    window = parts.events.window_limits.load(stored["replayer"])
    window.together[event_digest("r1")] = b"\x93\x01"  # a stored list cut short
    stored["replayer"] = window.to_bytes()
    (again,) = _send(parts, batch, stored)
    assert again.trigger_event_id == "r1" and again.items[0].item_id == other
    assert "stored co-occurrence candidates of user 'replayer' are unreadable" in caplog.text


def test_a_rejection_leads_nothing_and_the_rules_still_hold(parts: Processors) -> None:
    stored, first, then = _crowded(parts)
    (disliked,) = _send(parts, [Event("d1", "hater", first.item_id, "dislike", START + 10_000)], stored)
    assert then not in {i.item_id for i in disliked.items[:1]}
    # A category the standing rules leave out stays out, however strongly it co-occurs.
    category = next(i.category for i in parts.items if i.item_id == then)
    parts.events.recommender.rules = ItemFilter(exclude_categories=(category,))
    (ruled,) = _send(parts, [Event("r1", "ruled", first.item_id, "view", START + 10_000)], stored)
    assert then not in {i.item_id for i in ruled.items}
    parts.events.recommender.rules = None
    # An item taken off sale stays out too.
    gone = next(i for i in parts.items if i.item_id == then)
    parts.catalog.process([IncomingMessage(then.encode(), encode_item(_unavailable(gone)), "items", 0, 99)])
    (unsold,) = _send(parts, [Event("s1", "shopper", first.item_id, "view", START + 10_000)], stored)
    assert then not in {i.item_id for i in unsold.items}


def _unavailable(item: Any) -> Any:
    return replace(item, available=False, ts=item.ts + 1)


def test_a_list_is_the_fused_ranking_of_the_catalogue_though_the_store_turns_most_candidates_away(
    parts: Processors,
) -> None:
    """Candidates the search did not return are scored from cached vectors and only the best are vetted by the
    store; when it turns away more of them than it was asked about past the list's end, it is asked again,
    and the list is still the fused ranking over every available item."""
    stored: dict[str, bytes] = {}
    first, *followers = parts.items[:16]
    for n, item in enumerate(followers):  # each later follower co-occurs with the first item more often
        _crowd(parts, first.item_id, item.item_id, stored, n=3 + n, name=f"c{n}")
    gone = followers[-10:]  # the ten best of co-occurrence, more than VETTED_BEYOND past a 5-item list
    parts.catalog.process(
        [
            IncomingMessage(i.item_id.encode(), encode_item(_unavailable(i)), "items", 0, 100 + n)
            for n, i in enumerate(gone)
        ]
    )
    (listed,) = _send(parts, [Event("p1", "probe", first.item_id, "view", START + 10_000)], stored)

    recommender = parts.events.recommender
    fusion = recommender.encoder.fusion
    window = parts.events.window_limits.load(stored["probe"])
    now = recommender.current_with_interests("probe", window, k=5)
    assert now is not None
    counted = {
        item_id: score for item_id, score, _ in parts.events.cooccurrence.scores([first.item_id], 50, [first.item_id])
    }
    eligible = [i.item_id for i in parts.items if i.item_id != first.item_id and i not in gone]
    vectors = recommender.item_vectors(eligible)
    fused = {
        item_id: float(fusion.fused((now[1] @ vectors[item_id]).max(), counted.get(item_id, 0.0)))
        for item_id in eligible
    }
    expected = sorted(fused, key=lambda item_id: -fused[item_id])[:5]
    assert [item.item_id for item in listed.items] == expected
    assert set(expected) == {item.item_id for item in followers[:5]}  # co-occurrence's five still on sale
