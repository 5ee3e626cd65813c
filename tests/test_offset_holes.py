"""Finding the offsets a stream jumped over or never delivered (faust-streaming #596)."""

from __future__ import annotations

from streams.worker.offset_holes import OffsetHoles, UndeliveredWatch


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


def test_the_next_expected_offset_is_the_committed_one_until_this_generation_delivers() -> None:
    holes: OffsetHoles[str] = OffsetHoles()
    assert holes.expected(1, "p0", 40) == 40
    holes.skipped(1, [("p0", 40), ("p0", 41)], {"p0": 40}.get)
    assert holes.expected(1, "p0", 40) == 42
    assert holes.expected(2, "p0", 30) == 30  # a rebalance: what this worker saw before no longer counts


def test_a_partition_is_stalled_when_two_idle_looks_find_the_same_undelivered_offsets() -> None:
    watch: UndeliveredWatch[str] = UndeliveredWatch()
    # p0 fetched up to 232 but the stream expects 177; p1 is caught up; p2 has no expected offset yet.
    offsets = {"p0": (177, 233), "p1": (50, 50), "p2": (None, 9)}
    assert watch.stalled((1, 10), offsets) == []  # one look: the messages may still be on their way
    assert watch.stalled((1, 10), offsets) == [("p0", 177, 233)]
    assert watch.stalled((1, 10), offsets) == []  # sought back: it must be seen stalled twice again


def test_progress_between_looks_is_no_stall() -> None:
    watch: UndeliveredWatch[str] = UndeliveredWatch()
    watch.stalled((1, 10), {"p0": (177, 233)})
    assert watch.stalled((1, 11), {"p0": (177, 233)}) == []  # a batch ran in between
    assert watch.stalled((2, 11), {"p0": (177, 233)}) == []  # a rebalance in between
    assert watch.stalled((2, 11), {"p0": (180, 233)}) == []  # the stream moved on
    watch.busy()  # a look skipped while a batch ran
    assert watch.stalled((2, 12), {"p0": (180, 233)}) == []
    assert watch.stalled((2, 12), {"p0": (180, 233)}) == [("p0", 180, 233)]
