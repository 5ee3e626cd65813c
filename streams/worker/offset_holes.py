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

A hole shows only when a later message of the partition arrives. When the messages it
dropped were a partition's last ones, none does: the consumer's fetch position stands past
them, the stream waits for more, and the events stay unanswered (in one run of the bench,
56 events behind a stale message). ``UndeliveredWatch`` finds such a partition while the
events agent is idle, and the agent seeks it back to the offset the stream expects next,
so that Faust fetches and delivers those messages again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Partition = TypeVar("Partition", bound=Hashable)


@dataclass
class OffsetHoles(Generic[Partition]):
    """The offsets the stream jumped over between batches (faust-streaming #596), per partition."""

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

    def expected(self, generation: int, partition: Partition, committed: int | None) -> int | None:
        """The offset ``partition`` should deliver next: after the last one delivered in this consumer
        generation, else the committed offset (None when neither is known)."""
        if generation == self._generation and partition in self._next:
            return self._next[partition]
        return committed


Look = tuple[int, int]  # (rebalances so far, micro-batches processed so far), taken while no batch runs


@dataclass
class UndeliveredWatch(Generic[Partition]):
    """Partitions whose consumer has fetched past the offset the stream should deliver next, and delivers nothing.

    Fetched messages reach an idle agent within its batch time bound, so one look proves nothing, but the
    same gap at two looks in a row, with no micro-batch processed and no rebalance between them, does:
    those messages are not coming.
    """

    _previous: dict[Partition, tuple[Look, int, int]] = field(default_factory=dict)

    def stalled(
        self, look: Look, offsets: Mapping[Partition, tuple[int | None, int]]
    ) -> list[tuple[Partition, int, int]]:
        """``offsets``: per partition, (the offset the stream should deliver next, the consumer's position).
        Returns ``(partition, expected, position)`` for each partition to seek back to ``expected``."""
        gaps = {
            partition: (look, expected, position)
            for partition, (expected, position) in offsets.items()
            if expected is not None and position > expected
        }
        stalled = [
            (p, expected, position)
            for p, (seen, expected, position) in gaps.items()
            if self._previous.get(p) == (seen, expected, position)
        ]
        for partition, _, _ in stalled:
            del gaps[partition]  # sought back: a fresh start
        self._previous = gaps
        return stalled

    def busy(self) -> None:
        """A look skipped (a batch running: progress, or a batch that takes long) or cut short: no proof either way."""
        self._previous = {}
