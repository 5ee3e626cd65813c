"""The worker's collector schedule: what the stream keeps is frozen out of full passes, and a cycle that dies
while frozen is still reclaimed at the next thaw."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from streams.worker.collector import CollectorSchedule


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_at_a_freeze_point_leave_the_collector_and_a_dead_cycle_returns_at_the_thaw(
    thawed: None,
) -> None:
    now = [0.0]
    schedule = CollectorSchedule(freeze_every_s=5, thaw_every_s=60, clock=lambda: now[0])
    kept = [_Node() for _ in range(1000)]
    schedule.after_batch()
    assert gc.get_freeze_count() == 0  # not yet due
    now[0] = 5.0
    schedule.after_batch()
    frozen = gc.get_freeze_count()
    assert frozen >= len(kept)

    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a reference cycle: only the collector frees it
    gone = weakref.ref(a)
    now[0] = 11.0
    schedule.after_batch()  # frozen with the rest
    del a, b
    gc.collect()
    assert gone() is not None  # a frozen cycle is out of the collector's reach...
    now[0] = 61.0
    schedule.after_batch()
    assert gone() is None  # ...until the thaw
    assert gc.get_freeze_count() >= len(kept)  # and what lives is frozen again


def test_a_cycle_that_dies_before_its_freeze_point_is_collected_then(thawed: None) -> None:
    now = [0.0]
    schedule = CollectorSchedule(freeze_every_s=5, thaw_every_s=60, clock=lambda: now[0])
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    now[0] = 5.0
    gc.disable()  # so that only the schedule's own pass can free it
    try:
        schedule.after_batch()
    finally:
        gc.enable()
    assert gone() is None
