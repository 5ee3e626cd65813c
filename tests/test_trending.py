"""The in-stream popularity behind the cold-start list."""

from __future__ import annotations

import msgpack
import pytest

from streams.errors import InvalidRecord
from streams.records import Event
from streams.trending import PartitionedTrending, Trending

HOUR_MS = 3_600_000


def _event(item_id: str, ts: int, n: int = 0) -> Event:
    return Event(f"{item_id}-{ts}-{n}", "u", item_id, "view", ts)


def test_recent_events_outweigh_older_ones_by_their_half_life() -> None:
    trending = Trending(half_life_s=3600)
    now = 1_000 * HOUR_MS
    trending.add([_event("old-hit", now - 2 * HOUR_MS, n) for n in range(3)])  # 3 events, two half-lives ago
    trending.add([_event("new", now)])  # 1 event now: worth 1, against 3 x 1/4
    trending.add([_event("older-hit", now - 2 * HOUR_MS, n) for n in range(5)])  # 5 x 1/4 = 1.25
    ranked = trending.top(3)
    assert [item for item, _ in ranked] == ["older-hit", "new", "old-hit"]
    assert ranked[1][1] == pytest.approx(1 / 1.25) and ranked[2][1] == pytest.approx(0.75 / 1.25)
    assert [item for item, _ in trending.top(2, exclude=["older-hit"])] == ["new", "old-hit"]


def test_only_the_most_popular_are_kept() -> None:
    trending = Trending(half_life_s=3600, capacity=10)
    trending.add([_event(f"item-{i}", HOUR_MS, n) for i in range(30) for n in range(i)])  # item-i seen i times
    assert len(trending) <= 12
    assert [item for item, _ in trending.top(3)] == ["item-29", "item-28", "item-27"]


def test_the_first_items_are_the_head_of_the_whole_ranking_ties_included() -> None:
    trending = Trending(half_life_s=3600)
    # item-i seen i % 7 times, all at one time: many items tie, and ties are ranked by item id.
    trending.add([_event(f"item-{i:03d}", HOUR_MS, n) for i in range(300) for n in range(i % 7 + 1)])
    ranked = trending.log_scores()
    assert ranked == sorted(ranked, key=lambda kv: (-kv[1], kv[0])) and len(ranked) == 300
    for depth in (0, 1, 42, 43, 44, 299, 300, 301):
        assert trending.log_scores(depth) == ranked[:depth], depth


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Trending(half_life_s=0)


def test_partitions_are_counted_apart_and_merged_with_other_workers_counts() -> None:
    trending = PartitionedTrending(half_life_s=3600)
    trending.add({0: [_event("a", HOUR_MS, n) for n in range(3)], 1: [_event("b", HOUR_MS, n) for n in range(2)]})
    trending.add({1: [_event("a", HOUR_MS, 9)]})
    assert trending.owned() == [0, 1]
    assert [item for item, _ in trending.top(2)] == ["a", "b"]
    assert trending.top(2)[1][1] == pytest.approx(2 / 4)
    # Another worker's partitions, as its /trending/partial reports them.
    other = Trending(half_life_s=3600)
    other.add([_event("c", HOUR_MS, n) for n in range(10)])
    assert [item for item, _ in trending.top(3, elsewhere=[other.log_scores(5)])] == ["c", "a", "b"]
    trending.drop(0)  # taken over by another worker: its counts go on there
    assert trending.owned() == [1] and [item for item, _ in trending.top(2)] == ["b", "a"]


def test_a_snapshot_restores_the_counts_and_anything_else_is_refused() -> None:
    counts = Trending(half_life_s=3600)
    counts.add([_event(f"item-{i}", HOUR_MS, n) for i in range(5) for n in range(i + 1)])
    restored = Trending(half_life_s=3600)
    restored.merge(Trending.scores_from_bytes(counts.to_bytes()))
    assert restored.top(5) == counts.top(5)
    assert [item for item, _ in Trending.scores_from_bytes(counts.to_bytes(depth=2))] == ["item-4", "item-3"]
    for raw in (b"\x81\xa1v\x02", b"not msgpack \xff", msgpack.packb([1, 2])):
        with pytest.raises(InvalidRecord):
            Trending.scores_from_bytes(raw)
