"""The trending counts outlive a worker: each owned events partition's counts are kept in the
trending table (changelogged, on that partition), restored by whoever owns the partition next
(the same worker restarted, or another after a rebalance), and dropped when it is taken away.

A snapshot is written every ``TRENDING_SNAPSHOT_S`` while its counts change, so a crash loses at most
that long of counts, and events replayed after a crash count twice: popularity is an estimate, and
the windows (which are exact) do not depend on it.
"""

from __future__ import annotations

import asyncio
import logging

import faust

from streams.errors import InvalidRecord
from streams.settings import Settings
from streams.trending import PartitionedTrending, Trending
from streams.worker.faust_compat import recovered
from streams.worker.tables import PartitionedTable

log = logging.getLogger(__name__)

TRENDING_SNAPSHOT_S = 2.0


def snapshot_key(partition: int) -> bytes:
    return str(partition).encode("ascii")


class TrendingKeeper:
    def __init__(
        self, app: faust.App, settings: Settings, trending: PartitionedTrending, table: PartitionedTable
    ) -> None:
        self.app = app
        self.events_topic = settings.events_topic
        self.trending = trending
        self.table = table
        self.restored: set[int] = set()  # owned partitions whose snapshot has been merged in
        self.written: dict[int, int] = {}  # partition → the counts' ``changes`` when last written

    async def tick(self) -> None:
        app = self.app
        if app.rebalancing or not recovered(app):
            return  # the table is being recovered: its snapshots are not all there yet
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == self.events_topic}
        for partition in (self.restored | set(self.trending.owned())) - assigned:
            self.trending.drop(partition)
            self.restored.discard(partition)
            self.written.pop(partition, None)
        for partition in sorted(assigned - self.restored):
            self._restore(partition)
        due = [p for p in sorted(assigned) if self.written.get(p) != self.trending.partition(p).changes]
        if due:
            loop = asyncio.get_running_loop()
            snapshots = await loop.run_in_executor(None, self._snapshots, due)  # sorting is off the loop
            for partition, (changes, raw) in snapshots.items():
                self.table.put(snapshot_key(partition), raw, partition)
                self.written[partition] = changes

    def _restore(self, partition: int) -> None:
        raw = self.table.get(snapshot_key(partition))
        if raw is not None:
            try:
                self.trending.partition(partition).merge(Trending.scores_from_bytes(raw))
            except InvalidRecord as exc:
                log.error("trending snapshot of partition %d is unreadable (%s); counting afresh", partition, exc)
        self.restored.add(partition)

    def _snapshots(self, partitions: list[int]) -> dict[int, tuple[int, bytes]]:
        snapshots = {}
        for partition in partitions:
            counts = self.trending.partition(partition)
            changes = counts.changes
            snapshots[partition] = (changes, counts.to_bytes())
        return snapshots
