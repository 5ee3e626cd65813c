"""What a worker counts per events partition outlives it: the trending counts and the item
co-occurrence are kept in changelogged tables, each record on its partition's changelog partition,
restored by whoever owns the partition next (the same worker restarted, or another after a
rebalance), and dropped when the partition is taken away.

Each is written while it changes (trending: a snapshot every ``TRENDING_SNAPSHOT_S``; co-occurrence:
the rows that changed, at most ``COOCCURRENCE_ROWS_PER_TICK`` a second per partition, so that table
writes never hold the event loop for long). A crash loses what was not yet written, and events replayed after a
crash count again: both are estimates, and the windows (which are exact) do not depend on them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import faust

from streams.cooccurrence import PartitionedCooccurrence
from streams.errors import InvalidRecord
from streams.settings import Settings
from streams.trending import PartitionedTrending, Trending
from streams.worker.faust_compat import recovered
from streams.worker.tables import PartitionedTable

log = logging.getLogger(__name__)

TRENDING_SNAPSHOT_S = 2.0
COOCCURRENCE_WRITE_S = 1.0
# Each row is a table write on the event loop and a changelog record through the broker: 200 rows a second
# per partition held the bench's lists back by seconds (p50 1.4 s at 250 events/s), 10 left p50 at 46 ms.
# The rows changed first go first; where more change than that, the table lags behind the live counts.
COOCCURRENCE_ROWS_PER_TICK = 10


class PartitionCounts(Protocol):
    """Counts kept per events partition, as the keeper handles them."""

    def owned(self) -> list[int]: ...

    def drop(self, partition: int) -> None: ...

    def restore(self, partition: int, table: PartitionedTable) -> None:
        """Merge what the table keeps of ``partition`` (an earlier owner's records)."""
        ...

    def due(self, partition: int) -> list[tuple[bytes, bytes]]:
        """The records to write for ``partition`` now (run off the event loop)."""
        ...


class PartitionKeeper:
    def __init__(self, app: faust.App, settings: Settings, counts: PartitionCounts, table: PartitionedTable) -> None:
        self.app = app
        self.events_topic = settings.events_topic
        self.counts = counts
        self.table = table
        self.restored: set[int] = set()  # owned partitions whose records have been merged in

    async def tick(self) -> None:
        app = self.app
        if app.rebalancing or not recovered(app):
            return  # the table is being recovered: its records are not all there yet
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == self.events_topic}
        for partition in (self.restored | set(self.counts.owned())) - assigned:
            self.counts.drop(partition)
            self.restored.discard(partition)
        for partition in sorted(assigned - self.restored):
            self.counts.restore(partition, self.table)
            self.restored.add(partition)
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, self._due, sorted(assigned))  # encoding is off the loop
        for partition, key, raw in records:
            self.table.put(key, raw, partition)

    def _due(self, partitions: list[int]) -> list[tuple[int, bytes, bytes]]:
        return [(partition, key, raw) for partition in partitions for key, raw in self.counts.due(partition)]


def _key(partition: int, item_id: str | None = None) -> bytes:
    return str(partition).encode("ascii") if item_id is None else f"{partition}/{item_id}".encode()


class TrendingSnapshots:
    """Each partition's trending counts as one snapshot record, written when they changed."""

    def __init__(self, trending: PartitionedTrending) -> None:
        self.trending = trending
        self.written: dict[int, int] = {}  # partition → the counts' ``changes`` when last written

    def owned(self) -> list[int]:
        return self.trending.owned()

    def drop(self, partition: int) -> None:
        self.trending.drop(partition)
        self.written.pop(partition, None)

    def restore(self, partition: int, table: PartitionedTable) -> None:
        raw = table.get(_key(partition))
        if raw is not None:
            try:
                self.trending.partition(partition).merge(Trending.scores_from_bytes(raw))
            except InvalidRecord as exc:
                log.error("trending snapshot of partition %d is unreadable (%s); counting afresh", partition, exc)

    def due(self, partition: int) -> list[tuple[bytes, bytes]]:
        counts = self.trending.partition(partition)
        changes = counts.changes
        if self.written.get(partition) == changes:
            return []
        self.written[partition] = changes
        return [(_key(partition), counts.to_bytes())]


class CooccurrenceRows:
    """Each partition's co-occurrence as one record per item row, the changed rows written a few at a time."""

    def __init__(self, cooccurrence: PartitionedCooccurrence) -> None:
        self.cooccurrence = cooccurrence

    def owned(self) -> list[int]:
        return self.cooccurrence.owned()

    def drop(self, partition: int) -> None:
        self.cooccurrence.drop(partition)

    def restore(self, partition: int, table: PartitionedTable) -> None:
        prefix = _key(partition) + b"/"
        rows = [(key[len(prefix) :].decode(), raw) for key, raw in table.items() if key.startswith(prefix)]
        try:
            self.cooccurrence.restore(partition, rows)
        except InvalidRecord as exc:
            log.error("co-occurrence of partition %d is unreadable (%s); counting afresh", partition, exc)
            self.cooccurrence.drop(partition)

    def due(self, partition: int) -> list[tuple[bytes, bytes]]:
        rows = self.cooccurrence.partition(partition).take_changed(COOCCURRENCE_ROWS_PER_TICK)
        return [(_key(partition, item_id), raw) for item_id, raw in rows]
