"""Everything the worker needs from Faust that Faust does not expose publicly, in one place.

Each function names the private attribute it reaches and why; an upgrade of faust-streaming checks
this module first.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

import faust
from faust import streams as faust_streams
from faust.tables.manager import TableManager


def take_batches(stream: faust.StreamT, max_events: int, within_s: float) -> AsyncIterator[Sequence[Any]]:
    """Micro-batches of events, acknowledged after the batch is processed.

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
