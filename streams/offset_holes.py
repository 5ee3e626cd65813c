"""Messages the stream skipped, found by the offsets it was handed.

During a rebalance with input flowing, faust-streaming can hand the stream a message
it fetched before the partitions were sought back to their committed offsets (its
issue #596). Faust then takes the offsets between its read position and that stale
message as read: it either records them as a hole in the partition and commits past
them (the events are never processed), or it drops them when they are fetched again,
and its commits stall behind them until a restart. Both were seen in the fault suite
with input flowing through a rebalance: 1,132 events of one partition committed but
never processed; 299 of another never processed, that partition's commits stuck.

A partition's messages reach the stream in offset order, starting after each rebalance
at the committed offset, and the events and control topics are neither compacted nor
written in transactions, so their offsets have no holes of their own. ``OffsetHoles``
reports every range of offsets the stream jumped over; the events agent reads those
offsets back from the broker, processes them like any batch, and then tells Faust they
are done, so that its commits move past them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Partition = TypeVar("Partition", bound=Hashable)


@dataclass
class OffsetHoles(Generic[Partition]):
    _generation: int | None = None
    _next: dict[Partition, int] = field(default_factory=dict)  # the offset each partition should deliver next

    def skipped(
        self,
        generation: int,
        delivered: Sequence[tuple[Partition, int]],
        committed: Callable[[Partition], int | None],
    ) -> list[tuple[Partition, int, int]]:
        """The ranges ``[start, stop)`` of offsets each partition jumped over in ``delivered`` (a batch's
        messages in stream order). A new consumer generation (a rebalance) makes every partition start
        again from its committed offset (None: nothing committed yet, so the first offset delivered counts)."""
        if generation != self._generation:
            self._generation, self._next = generation, {}
        holes = []
        for partition, offset in delivered:
            expected = self._next[partition] if partition in self._next else committed(partition)
            if expected is not None and offset > expected:
                holes.append((partition, expected, offset))
            if expected is None or offset >= expected:
                self._next[partition] = offset + 1
        return holes
