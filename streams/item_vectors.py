"""The item vectors the event path reads, cached in front of the vector store.

Every micro-batch needs the vectors of every item in every touched window (a few
thousand) and of every candidate; fetching them from the store each time was a
fifth of the worker's time per event. The cache is bounded (least recently used
items leave first) and time-limited: this worker's own catalogue changes update
it at once, and changes made by other workers (which consume other partitions of
the catalogue topic into a shared Qdrant server) are seen within ``ttl_s``.

Vectors are rows of one matrix, and a batch gets its own copy of the rows it asked
for (``ItemVectors``): one gather instead of a Python object per vector, and a
catalogue change on another thread cannot alter a batch's vectors halfway through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, KeysView, Mapping, Sequence

import numpy as np

from streams.ports import ItemEncoderRuntime, TextEmbedder, VectorPoint, VectorStore
from streams.records import Item
from streams.settings import Settings

FIRST_ROWS = 1024  # the matrix grows by doubling up to the capacity
EVICTED_SHARE = 16  # a full cache frees 1/16 of its rows at once, the least recently used


class ItemVectors(Mapping[str, np.ndarray]):
    """A batch's item vectors: id → row of one matrix of its own."""

    def __init__(self, rows: dict[str, int], matrix: np.ndarray) -> None:
        self._rows = rows
        self._matrix = matrix

    @classmethod
    def of(cls, vectors: Mapping[str, np.ndarray]) -> ItemVectors:
        if not vectors:
            return EMPTY
        return cls(
            dict(zip(vectors, range(len(vectors)), strict=True)), np.stack(list(vectors.values())).astype(np.float32)
        )

    def __getitem__(self, item_id: str) -> np.ndarray:
        return self._matrix[self._rows[item_id]]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def keys(self) -> KeysView[str]:
        return self._rows.keys()  # the dict's own view: membership tests without a Python call each

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def stack(self, item_ids: Sequence[str]) -> np.ndarray:
        """[len(item_ids), dim]: the vectors of these ids (all of them known), in order."""
        rows = self._rows
        return self._matrix[[rows[i] for i in item_ids]]

    def merged(self, other: ItemVectors) -> ItemVectors:
        """These vectors and ``other``'s (``other`` wins where both have an id)."""
        if not other:
            return self
        if not self:
            return other
        offset = len(self._matrix)
        rows = {**self._rows, **{item_id: offset + row for item_id, row in other._rows.items()}}
        return ItemVectors(rows, np.concatenate([self._matrix, other._matrix]))


EMPTY = ItemVectors({}, np.zeros((0, 0), dtype=np.float32))


class ItemVectorCache:
    def __init__(
        self,
        store: VectorStore,
        collection: str,
        *,
        capacity: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.collection = collection
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        self._rows: dict[str, int] = {}  # item id → row of the matrices below
        self._ids: list[str | None] = []  # row → item id (None: free)
        self._free: list[int] = []
        self._matrix = np.zeros((0, 0), dtype=np.float32)  # sized at the first vector
        self._fetched_at = np.zeros(0)  # when each row was read from the store (the time limit)
        self._used = np.zeros(0, dtype=np.int64)  # the get that last read each row (least recently used)
        self._gets = 0
        self._lock = threading.Lock()  # the event and catalogue threads both write

    @classmethod
    def sized_by(cls, settings: Settings, store: VectorStore, collection: str) -> ItemVectorCache:
        """The cache a worker keeps in front of ``collection``, bounded as the settings say."""
        return cls(store, collection, capacity=settings.item_cache_size, ttl_s=settings.item_cache_ttl_s)

    def get(self, item_ids: Sequence[str]) -> ItemVectors:
        """Vectors of the ids the catalogue holds; unknown (or deleted) ids are absent."""
        now = self.clock()
        with self._lock:
            self._gets += 1
            looked = list(map(self._rows.get, item_ids))  # map, not a loop: this runs for ~10,000 ids a batch
            complete = None not in looked
            if complete:
                present, rows = list(item_ids), np.array(looked, dtype=np.int64)
            else:
                pairs = [(item_id, row) for item_id, row in zip(item_ids, looked, strict=True) if row is not None]
                present, rows = [item_id for item_id, _ in pairs], np.array([row for _, row in pairs], dtype=np.int64)
            fresh = now - self._fetched_at[rows] < self.ttl_s
            if not fresh.all():
                complete = False
                present, rows = (
                    [item_id for item_id, ok in zip(present, fresh.tolist(), strict=True) if ok],
                    rows[fresh],
                )
            self._used[rows] = self._gets
            kept = ItemVectors(dict(zip(present, range(len(rows)), strict=True)), self._matrix[rows])
        if complete:
            return kept
        missing = [item_id for item_id in item_ids if item_id not in kept]
        fetched = self.store.fetch_vectors(self.collection, missing)
        self.put(fetched, now)
        return kept.merged(ItemVectors.of(fetched))

    def put(self, vectors: Mapping[str, np.ndarray], now: float | None = None) -> None:
        stamp = self.clock() if now is None else now
        with self._lock:
            for item_id, vector in vectors.items():
                row = self._rows.get(item_id)
                if row is None:
                    row = self._row_for(item_id, len(vector))
                self._matrix[row] = vector
                self._fetched_at[row] = stamp
                self._used[row] = self._gets

    def _row_for(self, item_id: str, dim: int) -> int:
        if not self._free:
            self._make_room(dim)
        row = self._free.pop()
        self._rows[item_id] = row
        self._ids[row] = item_id
        return row

    def _make_room(self, dim: int) -> None:
        size = len(self._ids)
        if size < self.capacity:
            grown = min(self.capacity, max(FIRST_ROWS, 2 * size))
            matrix = np.zeros((grown, dim), dtype=np.float32)
            if size:
                matrix[:size] = self._matrix
            self._matrix = matrix
            self._fetched_at = np.concatenate([self._fetched_at, np.zeros(grown - size)])
            self._used = np.concatenate([self._used, np.zeros(grown - size, dtype=np.int64)])
            self._ids += [None] * (grown - size)
            self._free += range(grown - 1, size - 1, -1)
            return
        evicted = max(1, size // EVICTED_SHARE)
        for row in np.argpartition(self._used, evicted - 1)[:evicted].tolist():
            self._free_row(row)

    def _free_row(self, row: int) -> None:
        item_id = self._ids[row]
        if item_id is not None:
            del self._rows[item_id]
            self._ids[row] = None
            self._free.append(row)

    def discard(self, item_ids: Sequence[str]) -> None:
        with self._lock:
            for item_id in item_ids:
                row = self._rows.get(item_id)
                if row is not None:
                    self._free_row(row)

    def __len__(self) -> int:
        return len(self._rows)


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
