"""The item-vector cache in front of the store: hits, bound, time limit, and this worker's own changes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streams.item_vectors import EVICTED_SHARE, FIRST_ROWS, ItemVectorCache, ItemVectors
from streams.ports import VectorPoint
from streams.stores.edge import EdgeVectorStore


class CountingStore(EdgeVectorStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fetched: list[str] = []

    def fetch_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        self.fetched.extend(ids)
        return super().fetch_vectors(collection, ids)


def _store(tmp_path: Path, n: int) -> CountingStore:
    store = CountingStore(tmp_path)
    store.ensure_collection("items", 4)
    store.upsert("items", [VectorPoint(f"i{k}", np.full(4, k, dtype=np.float32)) for k in range(n)])
    return store


def test_hits_are_served_from_memory_and_misses_fetched_once(tmp_path: Path) -> None:
    store = _store(tmp_path, 5)
    cache = ItemVectorCache(store, "items", capacity=10, ttl_s=60)
    first = cache.get(["i1", "i2", "nope"])
    assert set(first) == {"i1", "i2"} and first["i2"][0] == 2
    assert set(cache.get(["i1", "i2", "i3"])) == {"i1", "i2", "i3"}
    assert store.fetched == ["i1", "i2", "nope", "i3"]  # unknown ids are asked again: they may be published later


def test_least_recently_used_items_leave_first(tmp_path: Path) -> None:
    store = _store(tmp_path, 5)
    cache = ItemVectorCache(store, "items", capacity=2, ttl_s=60)
    cache.get(["i0", "i1"])
    cache.get(["i0"])  # i1 is now the least recently used
    cache.get(["i2"])
    assert len(cache) == 2
    store.fetched.clear()
    cache.get(["i0", "i1"])
    assert store.fetched == ["i1"]


def test_entries_expire_and_own_catalogue_changes_apply_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path, 3)
    now = [0.0]
    cache = ItemVectorCache(store, "items", capacity=10, ttl_s=5, clock=lambda: now[0])
    cache.get(["i1"])
    store.upsert("items", [VectorPoint("i1", np.full(4, 9, dtype=np.float32))])  # another worker's change
    assert cache.get(["i1"])["i1"][0] == 1
    now[0] = 6.0
    assert cache.get(["i1"])["i1"][0] == 9  # seen after the time limit
    cache.put({"i1": np.full(4, 7, dtype=np.float32)})
    assert cache.get(["i1"])["i1"][0] == 7
    cache.discard(["i1"])
    store.delete("items", ["i1"])
    assert cache.get(["i1"]) == {}


def test_a_batch_keeps_the_vectors_it_was_given_while_the_catalogue_changes(tmp_path: Path) -> None:
    store = _store(tmp_path, 3)
    cache = ItemVectorCache(store, "items", capacity=10, ttl_s=60)
    batch = cache.get(["i1", "i2"])
    cache.put({"i1": np.full(4, 7, dtype=np.float32)})  # the catalogue thread, mid-batch
    cache.discard(["i2"])
    assert batch["i1"][0] == 1 and batch["i2"][0] == 2
    np.testing.assert_array_equal(batch.stack(["i2", "i1", "i2"])[:, 0], [2, 1, 2])
    later = cache.get(["i1"]).merged(ItemVectors.of({"new": np.full(4, 5, dtype=np.float32)}))
    assert later["i1"][0] == 7 and later["new"][0] == 5 and len(later) == 2


def test_a_full_cache_frees_its_least_recently_used_rows_and_keeps_the_rest(tmp_path: Path) -> None:
    capacity = 3 * FIRST_ROWS  # past the first allocation, so the matrix grows on the way
    cache = ItemVectorCache(_store(tmp_path, 0), "items", capacity=capacity, ttl_s=60)
    cache.put({f"x{k}": np.full(4, k, dtype=np.float32) for k in range(capacity)})
    recent = [f"x{k}" for k in range(0, capacity, 2)]
    cache.get(recent)
    cache.put({"one more": np.zeros(4, dtype=np.float32)})
    assert len(cache) == capacity - capacity // EVICTED_SHARE + 1
    kept = cache.get(recent)
    assert len(kept) == len(recent) and kept["x10"][0] == 10  # only rows no recent get read were freed
