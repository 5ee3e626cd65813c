"""The item vectors the event path reads, cached in front of the vector store.

Every micro-batch needs the vectors of every item in every touched window (a few
thousand) and of every candidate; fetching them from the store each time was a
fifth of the worker's time per event. The cache is bounded (least recently used
items leave first) and time-limited: this worker's own catalogue changes update
it at once, and changes made by other workers (which consume other partitions of
the catalogue topic into a shared Qdrant server) are seen within ``ttl_s``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from streams.ports import VectorStore
from streams.settings import Settings


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
        self._entries: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._lock = threading.Lock()  # the event and catalogue threads both write

    @classmethod
    def sized_by(cls, settings: Settings, store: VectorStore, collection: str) -> ItemVectorCache:
        """The cache a worker keeps in front of ``collection``, bounded as the settings say."""
        return cls(store, collection, capacity=settings.item_cache_size, ttl_s=settings.item_cache_ttl_s)

    def get(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of the ids the catalogue holds; unknown (or deleted) ids are absent."""
        now = self.clock()
        found: dict[str, np.ndarray] = {}
        missing = []
        with self._lock:
            for item_id in item_ids:
                entry = self._entries.get(item_id)
                if entry is not None and now - entry[1] < self.ttl_s:
                    self._entries.move_to_end(item_id)
                    found[item_id] = entry[0]
                else:
                    missing.append(item_id)
        if missing:
            fetched = self.store.fetch_vectors(self.collection, missing)
            self.put(fetched, now)
            found.update(fetched)
        return found

    def put(self, vectors: Mapping[str, np.ndarray], now: float | None = None) -> None:
        stamp = self.clock() if now is None else now
        with self._lock:
            for item_id, vector in vectors.items():
                self._entries[item_id] = (vector, stamp)
                self._entries.move_to_end(item_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def discard(self, item_ids: Sequence[str]) -> None:
        with self._lock:
            for item_id in item_ids:
                self._entries.pop(item_id, None)

    def __len__(self) -> int:
        return len(self._entries)
