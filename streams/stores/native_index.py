"""The worker's read path over an embedded collection: an in-process HNSW index (usearch) mirroring it.

Why: a search through Qdrant Edge's binding holds the interpreter lock for the whole call and costs
~250-320 µs a query at 100k × 64-d items, filtering the window's ~50 items with a ``has_id``
condition; usearch's HNSW over the same vectors answers an over-fetched query (limit + the window)
in ~85 µs with the same recall, and releases the lock while it searches. Qdrant stays where vectors
are written and kept; this index is rebuilt from it whenever a worker opens the collection. Opt-in
(``RTREC_NATIVE_SEARCH_FROM``): in-process the worker's search stage went from 427 to 244 µs an event,
but ``rtrec bench``'s end-to-end figures did not move beyond their run-to-run noise (``BENCHMARKS.md``).

Exact mirror: the embedded store is written by this process only (Qdrant Edge locks its shard), and
every write goes to the shard and to the index under one lock. The index is built in the background
from a scroll of the shard, a chunk at a time under that lock, so a write lands either before a
chunk is read (the chunk carries it) or after the chunk went in (and replaces it). Until the build
is done, Qdrant answers.

Searches with business rules (``ItemFilter``) stay with Qdrant's payload filters, and searches among given
ids (``only_ids``: co-occurrence's candidates) with its ``has_id`` condition: one Qdrant call for those was
faster than scoring them here (in-process, with a fusing model: 942 µs an event with them in Qdrant, 1,176
with them here, 990 with every search in Qdrant).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# ONNX Runtime's extension must be loaded before usearch's: the other order crashes the process (SIGSEGV in
# libstdc++'s locale set-up as onnxruntime initialises; usearch 2.26.6 with onnxruntime 1.31.1). Every process
# that searches natively also encodes, so this costs nothing but the order.
import onnxruntime  # noqa: F401  # isort: skip
from usearch.index import Index, Matches  # isort: skip

from streams.ports import SearchQuery
from streams.stores.search import point_ids

log = logging.getLogger(__name__)

CONNECTIVITY = 16  # HNSW links per node (Qdrant's default m)
EXPANSION_ADD = 64  # candidates while linking a new node
DEFAULT_EF = 64  # candidates per search when RTREC_SEARCH_EF is 0; never fewer than the hits asked for
BUILD_CHUNK = 1024  # points read from the shard and added per hold of the lock

Scored = list[tuple[int, float]]  # (point id, dot product), best first


class NativeIndex:
    """Dot-product HNSW over point ids (unsigned 64-bit ints). Not thread-safe: ``IndexMirror`` locks it."""

    def __init__(self, dim: int, ef: int) -> None:
        self.ef = ef or DEFAULT_EF
        self._index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD)

    def __len__(self) -> int:
        return len(self._index)

    def put(self, keys: Sequence[int], vectors: np.ndarray) -> None:
        """Add the points, replacing the vectors of keys already held."""
        if not keys:
            return
        ids = np.asarray(keys, dtype=np.uint64)
        held = np.asarray(self._index.contains(ids), dtype=bool)
        if held.any():
            self._index.remove(ids[held])
        self._index.add(ids, np.ascontiguousarray(vectors, dtype=np.float32), threads=1)

    def remove(self, keys: Sequence[int]) -> None:
        if keys:
            self._index.remove(np.asarray(keys, dtype=np.uint64))

    def search(self, vectors: np.ndarray, counts: Sequence[int]) -> list[Scored]:
        """The approximate ``counts[i]`` nearest points to each vector by dot product, best first."""
        if not len(self._index):
            return [[] for _ in counts]
        deepest = max(counts)
        self._index.expansion_search = max(self.ef, deepest)  # type: ignore[misc]  # a setter usearch's stub misses
        found = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), deepest, threads=1)
        if isinstance(found, Matches):  # what usearch returns for a batch of one
            keys, distances, counted = found.keys[None], found.distances[None], [len(found.keys)]
        else:
            keys, distances, counted = found.keys, found.distances, found.counts.tolist()
        # usearch's inner-product distance is 1 - dot.
        return [
            list(zip(k[: min(n, wanted)].tolist(), (1.0 - d[: min(n, wanted)]).tolist(), strict=True))
            for k, d, n, wanted in zip(keys, distances, counted, counts, strict=True)
        ]


class IndexMirror:
    """One collection's ``NativeIndex``, kept exactly in step with the shard it mirrors (see the module)."""

    def __init__(self, name: str, dim: int, ef: int, read_chunk: Callable[[Any], tuple[list[Any], Any]]) -> None:
        """``read_chunk(offset)``: the shard's next points from ``offset`` (None: the first) with their
        vectors, and the offset after them (None at the end)."""
        self.name = name
        self.index = NativeIndex(dim, ef)
        self.lock = threading.Lock()  # writes and each build chunk hold it; searches too (usearch is not guarded)
        self._read_chunk = read_chunk
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._build, name=f"native-index-{name}", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def search(self, batch: Sequence[tuple[SearchQuery, int]]) -> list[Scored]:
        """Each (query, limit): at most ``limit`` points, best first, none of its ``exclude_ids``. Its
        ``item_filter`` and ``only_ids`` are not applied: such queries stay with Qdrant (see the module)."""
        excluded = [set(point_ids(query.exclude_ids)) for query, _ in batch]
        with self.lock:
            found = self.index.search(
                np.stack([query.vector for query, _ in batch]),
                # Enough to fill the list when every excluded item is among the nearest.
                [limit + len(skip) for (_, limit), skip in zip(batch, excluded, strict=True)],
            )
        return [
            [(key, score) for key, score in hits if key not in skip][:limit]
            for hits, skip, (_, limit) in zip(found, excluded, batch, strict=True)
        ]

    def _build(self) -> None:
        offset: Any = None
        try:
            while not self._stopping.is_set():
                with self.lock:
                    records, offset = self._read_chunk(offset)
                    points = [(r.id, r.vector) for r in records if isinstance(r.vector, list)]
                    if points:
                        self.index.put([i for i, _ in points], np.array([v for _, v in points], dtype=np.float32))
                if offset is None:
                    log.info("native index of %s built: %d points", self.name, len(self.index))
                    self._ready.set()
                    return
        except Exception:  # the store keeps answering through Qdrant; the index is just not used
            log.exception("building the native index of %s failed; Qdrant keeps serving its searches", self.name)
