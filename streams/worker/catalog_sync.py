"""Each item tower's own collection, filled from the catalogue topic.

Item vectors made by different towers live in different spaces, so each tower gets
its own collection, ``<RTREC_ITEMS_COLLECTION>-<tower id>``. A model with a new tower
therefore starts from an empty collection. It is filled from the catalogue topic,
which is compacted and so holds the latest version of every item:

- at start-up, with the items the collection lacks, before any event is read;
- in the background before a model swap (``streams.worker.model_swap``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from streams.clients.kafka_io import TopicRecord, end_offsets, read_until
from streams.errors import InvalidRecord
from streams.item_vectors import ItemEmbedder
from streams.ports import ItemEncoderRuntime, VectorStore
from streams.records import Item, Limits, decode_item
from streams.settings import Settings

log = logging.getLogger(__name__)

READ_CHUNK = 512


def items_collection_name(base: str, item_encoder: ItemEncoderRuntime) -> str:
    return f"{base}-{item_encoder.tower_id}"


@dataclass(frozen=True)
class CatalogChange:
    """The latest version of one item read from the catalogue topic."""

    item_id: str
    item: Item | None  # None: the item was deleted


def catalogue_ends(settings: Settings) -> dict[int, int]:
    """The catalogue topic's end offset per partition (empty when the topic does not exist yet)."""
    return end_offsets(settings, settings.items_topic)


def read_catalog(
    settings: Settings, until: Mapping[int, int], timeout_s: float = 300.0
) -> Iterator[list[CatalogChange]]:
    """The catalogue topic from its start up to ``until`` (end offsets), in chunks, in topic order per partition.

    Records that do not decode are left out: the catalogue agent dead-lettered them when they arrived.
    """
    limits = settings.limits()
    for records in read_until(settings, settings.items_topic, until, timeout_s, READ_CHUNK):
        changes = [change for record in records if (change := _change(record, limits)) is not None]
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
    for changes in read_catalog(settings, ends):
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


def _change(record: TopicRecord, limits: Limits) -> CatalogChange | None:
    try:
        if record.value is None:
            return CatalogChange(record.key.decode(), None) if record.key else None
        item = decode_item(record.value, record.key, limits)
    except (InvalidRecord, UnicodeDecodeError):
        return None
    return CatalogChange(item.item_id, item)
