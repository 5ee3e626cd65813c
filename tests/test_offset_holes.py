"""Finding the offsets a stream jumped over (faust-streaming #596): the ranges to read back."""

from __future__ import annotations

from streams.offset_holes import OffsetHoles


def test_every_range_of_offsets_a_partition_jumped_over_is_reported_once() -> None:
    holes: OffsetHoles[str] = OffsetHoles()
    committed = {"p0": 100, "p1": 50}.get
    assert holes.skipped(1, [("p0", 100), ("p1", 50), ("p0", 101), ("p0", 105), ("p0", 109)], committed) == [
        ("p0", 102, 105),
        ("p0", 106, 109),
    ]
    # Read back (or delivered again), offsets below the next expected one are no news; then on from 110.
    assert holes.skipped(1, [("p0", 103), ("p0", 110), ("p1", 51)], committed) == []


def test_after_a_rebalance_each_partition_starts_from_its_committed_offset() -> None:
    holes: OffsetHoles[str] = OffsetHoles()
    assert holes.skipped(1, [("p0", 100), ("p0", 101)], {"p0": 100}.get) == []
    # Another worker owned p0 meanwhile and committed up to 90 (less than this one saw): from 90 again.
    assert holes.skipped(2, [("p0", 95)], {"p0": 90}.get) == [("p0", 90, 95)]
    # The stale message was fetched before the seek; this stream never saw 120..149.
    assert holes.skipped(3, [("p0", 150)], {"p0": 120}.get) == [("p0", 120, 150)]


def test_without_a_committed_offset_the_first_message_delivered_sets_the_start() -> None:
    holes: OffsetHoles[str] = OffsetHoles()
    assert holes.skipped(1, [("p0", 7), ("p0", 8)], lambda partition: None) == []
    assert holes.skipped(1, [("p0", 12)], lambda partition: None) == [("p0", 9, 12)]
