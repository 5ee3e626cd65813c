"""Each item tower's own collection, filled from the catalogue topic.

Item vectors made by different towers live in different spaces, so each tower gets
its own collection, ``<RTREC_ITEMS_COLLECTION>-<tower id>``. A model with a new tower
therefore starts from an empty collection. It is filled from the catalogue topic,
which is compacted and so holds the latest version of every item:

- at start-up, with the items the collection lacks, before any event is read;
- in the background before a model swap (``streams.model_swap``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streams.errors import BrokerError, InvalidRecord
from streams.ports import ItemEncoderRuntime, TextEmbedder, VectorPoint, VectorStore
from streams.records import Item, Limits, decode_item
from streams.settings import Settings

log = logging.getLogger(__name__)
ConsumerRecord = Any  # kafka-python exports no type for its records

READ_CHUNK = 512


def items_collection_name(base: str, item_encoder: ItemEncoderRuntime) -> str:
    return f"{base}-{item_encoder.tower_id}"


@dataclass(frozen=True)
class CatalogChange:
    partition: int
    offset: int
    item_id: str
    item: Item | None  # None: the item was deleted


class ItemEmbedder:
    """Items → vectors of one item tower: text through the text encoder first when the tower reads it."""

    def __init__(self, text_embedder: TextEmbedder, item_encoder: ItemEncoderRuntime) -> None:
        self.text_embedder = text_embedder
        self.item_encoder = item_encoder

    def can_place(self, item: Item) -> bool:
        return self.item_encoder.reads_text or self.item_encoder.knows(item.item_id)

    def vectors(self, items: Sequence[Item]) -> np.ndarray:
        ids = [item.item_id for item in items]
        if not self.item_encoder.reads_text:
            return self.item_encoder.encode_batch(ids)
        return self.item_encoder.encode_batch(ids, self.text_embedder.embed_batch([item.text() for item in items]))

    def points(self, items: Sequence[Item]) -> list[VectorPoint]:
        placeable = [item for item in items if self.can_place(item)]
        vectors = self.vectors(placeable)
        return [VectorPoint(item.item_id, v, item.payload()) for item, v in zip(placeable, vectors, strict=True)]


def catalogue_ends(settings: Settings) -> dict[int, int]:
    """The catalogue topic's end offset per partition (empty when the topic does not exist yet)."""
    with _consumer(settings) as consumer:
        partitions = _partitions(consumer, settings.items_topic)
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()} if partitions else {}


def read_catalog(
    settings: Settings, until: Mapping[int, int], limits: Limits, timeout_s: float = 300.0
) -> Iterator[list[CatalogChange]]:
    """The catalogue topic from its start up to ``until`` (end offsets), in chunks, in topic order per partition.

    Records that do not decode are left out: the catalogue agent dead-lettered them when they arrived.
    """
    remaining = {p: end for p, end in until.items() if end > 0}
    if not remaining:
        return
    with _consumer(settings) as consumer:
        partitions = [TopicPartition(settings.items_topic, p) for p in remaining]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading the catalogue topic {settings.items_topic!r} took over {timeout_s:.0f} s")
            batches = consumer.poll(timeout_ms=500, max_records=READ_CHUNK)
            changes = [
                change
                for tp, records in batches.items()
                for record in records
                if record.offset < until[tp.partition] and (change := _change(tp.partition, record, limits)) is not None
            ]
            for tp in partitions:
                if tp.partition in remaining and consumer.position(tp) >= remaining[tp.partition]:
                    del remaining[tp.partition]
            if changes:
                yield changes


def latest(changes: Sequence[CatalogChange]) -> dict[str, CatalogChange]:
    """The last change of each item (changes are in topic order, and an item's are on one partition)."""
    return {change.item_id: change for change in changes}


def fill_missing(
    settings: Settings,
    store: VectorStore,
    collection: str,
    embedder: ItemEmbedder,
    progress: Callable[[str], None] = log.info,
) -> int:
    """Embed into ``collection`` every catalogue item it lacks, and delete the deleted ones; how many were embedded.

    Items it holds are left as they are: the catalogue agent applies changes made since, from its committed offsets.
    """
    ends = catalogue_ends(settings)
    embedded = 0
    for changes in read_catalog(settings, ends, settings.limits()):
        newest = latest(changes)
        store.delete(collection, [i for i, c in newest.items() if c.item is None])
        present = store.fetch_vectors(collection, [i for i, c in newest.items() if c.item is not None])
        missing = [c.item for i, c in newest.items() if c.item is not None and i not in present]
        if missing:
            store.upsert(collection, embedder.points(missing))
            embedded += len(missing)
            progress(f"catalogue into {collection}: {embedded:,} items embedded")
    if embedded:
        store.build_index(collection)
    return embedded


def _change(partition: int, record: ConsumerRecord, limits: Limits) -> CatalogChange | None:
    try:
        if record.value is None:
            return CatalogChange(partition, record.offset, record.key.decode("utf-8"), None) if record.key else None
        item = decode_item(record.value, record.key, limits)
    except (InvalidRecord, UnicodeDecodeError):
        return None
    return CatalogChange(partition, record.offset, item.item_id, item)


@contextmanager
def _consumer(settings: Settings) -> Iterator[KafkaConsumer]:
    """A plain consumer of the settings' cluster, closed on exit (no group: nothing is committed)."""
    try:
        consumer = KafkaConsumer(
            **settings.kafka_options(),
            client_id="rtrec-catalog-sync",
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
    except KafkaError as exc:
        raise BrokerError(f"cannot connect a consumer to {settings.bootstrap_servers}: {exc}") from None
    try:
        yield consumer
    finally:
        consumer.close()


def _partitions(consumer: KafkaConsumer, topic: str, wait_s: float = 2.0) -> list[TopicPartition]:
    """The topic's partitions; none if it does not exist (metadata can take a moment to arrive)."""
    deadline = time.monotonic() + wait_s
    ids = consumer.partitions_for_topic(topic)
    while not ids and time.monotonic() < deadline:
        time.sleep(0.1)
        ids = consumer.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(ids or ())]
