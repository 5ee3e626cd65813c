"""The worker's changelogged tables, each value on the changelog partition of the events it comes from:
the user windows (one per user), the trending snapshots (one per events partition), the item
co-occurrence (one per events partition and item) and a running experiment's counts (one per events
partition and report bucket)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import faust
from faust.types import TP

from streams.settings import Settings
from streams.worker.faust_compat import current_event_on

WINDOWS_TABLE = "user-windows"
TRENDING_TABLE = "trending"
COOCCURRENCE_TABLE = "cooccurrence"
EXPERIMENT_COUNTS_TABLE = "experiment-counts"


class PartitionedTable(faust.Table):
    """A table whose every write names its changelog partition: the one of the events it comes from.

    A micro-batch spans several partitions and its writes happen after the batch, outside
    any one event's context, so each write names its partition (the one its user's events
    came from) instead of Faust taking the current event's. That keeps changelog partition
    p holding exactly the windows of events partition p, which is what recovery after a
    rebalance assumes, also when the keys are pseudonyms that hash elsewhere. The RocksDB
    store files a key under "the current event's" partition, so a write also presents one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writing: dict[bytes, int] = {}

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        with self._writing_to(key, partition), current_event_on(partition):
            self[key] = value

    async def write_through(self, records: Iterable[tuple[bytes, bytes, int]]) -> list[asyncio.Future[Any]]:
        """Store each (key, value, partition) and send it to its changelog partition straight to the producer.

        The changelog record is the one ``put`` has Faust send (raw key and value, same topic and partition) and
        the local store gets the same value, so recovery reads it back alike; what is skipped is Faust's
        buffer of table writes, which publishes one record at a time from a task on the loop (a pending
        message, a future and sensors each). Returns the deliveries: a write is durable once its delivery is
        done. The same offset bookkeeping as Faust's follows each delivery (RocksDB keeps where it stands).
        """
        producer = self.app.producer
        topic = self.changelog_topic.get_topic_name()
        deliveries = []
        for key, value, partition in records:
            with current_event_on(partition):
                self.data[key] = value
            delivery = cast(asyncio.Future, await producer.send(topic, key, value, partition, None, None))
            delivery.add_done_callback(self._on_written)
            deliveries.append(delivery)
        return deliveries

    def _on_written(self, delivery: asyncio.Future[Any]) -> None:
        if not delivery.cancelled() and delivery.exception() is None:
            written = delivery.result()
            self.data.set_persisted_offset(TP(written.topic, written.partition), written.offset)

    def partition_for_key(self, key: Any) -> int | None:
        return self._writing.get(key)

    @contextmanager
    def _writing_to(self, key: bytes, partition: int) -> Iterator[None]:
        self._writing[key] = partition
        try:
            yield
        finally:
            del self._writing[key]


def windows_changelog_topic(settings: Settings) -> str:
    """The topic Faust backs the windows table with (a restarted worker recovers its windows from it)."""
    return f"{settings.app_id}-{WINDOWS_TABLE}-changelog"


def experiment_counts_changelog_topic(settings: Settings) -> str:
    """The topic the experiment counts live in: what `rtrec experiment report` reads."""
    return f"{settings.app_id}-{EXPERIMENT_COUNTS_TABLE}-changelog"


def _rocksdb_options(memory_mb: int) -> dict[str, int]:
    """Faust's RocksDB options that keep one partition's database within ``memory_mb``."""
    budget = memory_mb * 2**20
    return {"block_cache_size": budget * 3 // 4, "write_buffer_size": budget // 8, "max_write_buffer_number": 2}


def add_table(app: faust.App, settings: Settings, name: str) -> PartitionedTable:
    table = PartitionedTable(
        app,
        name=name,
        default=None,
        beacon=app.tables.beacon,
        partitions=settings.topic_partitions,
        key_type=bytes,  # bytes means the raw codec for the changelog
        value_type=bytes,
        use_partitioner=True,  # reads need no event context; writes name their partition (PartitionedTable)
        options=_rocksdb_options(settings.table_cache_mb) if settings.table_store.startswith("rocksdb") else None,
        # The changelog is the state: as durable as the pipeline's own topics.
        extra_topic_configs={"min.insync.replicas": str(settings.topic_min_insync_replicas)},
    )
    app.tables.add(table)
    return table
