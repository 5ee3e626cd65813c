"""Everything the worker needs from Faust that Faust does not expose publicly, in one place.

Each function names the private attribute it reaches and why; an upgrade of faust-streaming checks
this module first.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

import faust
from faust import streams as faust_streams
from faust.tables import recovery as faust_recovery
from faust.tables.manager import TableManager
from faust.types import TP
from faust.types.transports import ConsumerT

from streams.settings import BATCH_QUIET_S


async def take_batches(stream: faust.StreamT, max_events: int, within_s: float) -> AsyncIterator[Sequence[Any]]:
    """Micro-batches of events, acknowledged after the batch is processed, each taken as soon as the one
    before is done: with whatever arrived meanwhile, once ``max_events`` are buffered or no event has
    joined for ``BATCH_QUIET_S`` (at most ``within_s`` after its first event).

    Faust's ``take_events`` waits ``within`` after every batch, even with events waiting, which adds that
    wait to every event's latency at any load below the worker's capacity. This is its buffering (a
    stream processor that holds the stream while a batch is processed, manual acks, passive draining:
    private parts of ``faust.Stream``) with that wait replaced; the batch size then follows the load.
    """
    faust_stream = cast(faust.Stream, stream)
    buffer: list[Any] = []
    arrived = asyncio.Event()  # an event joined the buffer
    room = asyncio.Event()  # cleared while the buffer is full or handed out: the stream waits
    room.set()

    async def add_to_buffer(value: Any) -> Any:
        await room.wait()
        event = faust_stream.current_event
        if event is None:
            raise RuntimeError("a buffered event has no current_event")
        buffer.append(event)
        arrived.set()
        if len(buffer) >= max_events:
            room.clear()
        return value

    acks = faust_stream.enable_acks
    faust_stream.enable_acks = False  # acked below, once the batch is processed
    faust_stream.add_processor(add_to_buffer)
    faust_stream._enable_passive(cast(Any, aiter(faust_stream.channel)))  # no public way to drain passively
    try:
        while not faust_stream.should_stop:
            await _filled(faust_stream, buffer, arrived, max_events, within_s)
            if not buffer:
                continue
            room.clear()
            batch = list(buffer)
            try:
                yield batch
            finally:
                buffer.clear()
                for event in batch:
                    await faust_stream.ack(event)
                room.set()
    finally:
        faust_stream.enable_acks = acks
        faust_stream._processors.remove(add_to_buffer)  # no public way to remove a processor


async def _filled(
    stream: faust.Stream, buffer: list[Any], arrived: asyncio.Event, max_events: int, within_s: float
) -> None:
    """Returns when ``buffer`` holds a batch to take (see ``take_batches``), or empty to check for a stop."""
    arrived.clear()
    if not buffer:
        await stream.wait_for_stopped(cast(Any, arrived), timeout=within_s)  # mode accepts an asyncio.Event
        if not buffer:
            return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while len(buffer) < max_events and loop.time() < deadline:
        held = len(buffer)
        await asyncio.sleep(min(BATCH_QUIET_S, deadline - loop.time()))
        if len(buffer) == held:
            return


def faust_take_events(stream: faust.StreamT, max_events: int, within_s: float) -> AsyncIterator[Sequence[Any]]:
    """Faust's own micro-batches (a batch waits up to ``within_s`` after the one before, to fill).

    ``take_events`` exists on ``faust.Stream``, not on its ``StreamT`` protocol.
    """
    return cast(faust.Stream, stream).take_events(max_events, within=within_s)


def recovered(app: faust.App) -> bool:
    """Whether the worker's tables are recovered from their changelogs (``recovery`` is on the concrete
    table manager, not on its protocol)."""
    return bool(cast(TableManager, app.tables).recovery.completed.is_set() and not app.in_recovery)


def committed_offset(app: faust.App, tp: Any) -> int | None:
    """The committed offset (the next to read) Faust holds for ``tp``; None before the first commit."""
    return cast(Any, app.consumer)._committed_offset.get(tp)  # no public accessor


async def mark_processed(app: faust.App, tp: Any, first: int, last: int) -> None:
    """Tell Faust's consumer that offsets ``first`` to ``last`` of ``tp`` are done, so its commits may
    move past them although its stream never delivered them (no public way to say so)."""
    await cast(Any, app.consumer)._add_gap(tp, first, last)


class _EventOnPartition:
    """All a table store reads of the current event: its message's partition."""

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


@contextmanager
def current_event_on(partition: int) -> Iterator[None]:
    """Within the block, Faust's "current event" is one of ``partition``: the RocksDB store files a
    key under the current event's partition, and a batch's writes happen outside any event's context."""
    stand_in = _EventOnPartition(partition)  # held here: the context keeps only a weak reference
    token = faust_streams._current_event.set(weakref.ref(cast(Any, stand_in)))  # no public setter
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


class Recovery(faust_recovery.Recovery):  # Faust's name: its log lines ("[^---Recovery]: Worker ready") are read
    async def _seek_offsets(self, consumer: ConsumerT, tps: set[TP], offsets: Counter[TP], title: str) -> None:
        """A changelog partition assigned by a rebalance while a recovery runs has no offset yet (None) when
        that recovery seeks its standbys; Faust then seeks it to None and the worker crashes ("Offset must
        be a positive integer", faust-streaming 0.15.3). It is sought as Faust seeks one with nothing read
        yet (-1: the start); the recovery the rebalance signalled runs next and builds its offsets."""
        known = Counter({tp: -1 if offsets[tp] is None else offsets[tp] for tp in tps})
        await super()._seek_offsets(consumer, tps, known, title)


class RecoveringTableManager(TableManager):
    """Faust's table manager with the recovery above (``TableManager`` builds its recovery in this property)."""

    @property
    def recovery(self) -> faust_recovery.Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
