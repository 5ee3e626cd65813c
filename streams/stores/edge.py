"""Embedded Qdrant (Qdrant Edge, the Qdrant engine in-process) behind the ``VectorStore`` interface.

One shard per collection under ``<qdrant_path>/<collection>``. Ids, payloads and
ranking are those of the server store (``streams.stores.server``), so a pipeline
moves between the two without re-thinking anything.

Two measured facts shape this adapter (2-core CPU, 100k × 64-d items):
- A search whose filter combines excluded ids with a payload condition falls onto
  a slow path (tens of queries/s), while excluded ids alone cost nothing. So the
  window's items are excluded by the filter and unavailable items are dropped
  from an over-fetched hit list, fetching more when too few remain.
- Reading a hit's payload costs ~5 µs a point: the ranking fields of a list's 58
  candidates took 250-300 µs, more than the search itself (150-230 µs). So searches
  return point ids only, and the ranking fields come from ``HitFields``, which this
  process can keep exact because it is the shard's only writer.
- Building the HNSW index (``optimize``) blocks searches for its whole duration
  (seconds per 100k points). So it runs only where nothing is being served: after
  a bulk load and when a worker opens a collection with many unindexed points.
  Points upserted while serving sit in an exactly-searched segment until then.

One process holds a shard at a time (Qdrant Edge locks its write-ahead log). A worker
that finds its store locked, say by a predecessor still shutting down, waits for it
with backoff for up to ``lock_wait_s`` before it gives up with an error.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import qdrant_edge as edge

from streams.errors import VectorStoreError
from streams.ports import SearchHit, SearchQuery, VectorPoint
from streams.stores.native_index import BUILD_CHUNK, IndexMirror
from streams.stores.search import EXTERNAL_ID, RANKING_FIELDS, point_ids, rank_without_unavailable

log = logging.getLogger(__name__)

# Collections holding more unindexed points than this are indexed when opened.
INDEX_WHEN_UNINDEXED = 20_000
LOCK_WAIT_S = 120.0
MAX_LOCK_BACKOFF_S = 5.0
EdgePointId = int | UUID | str  # what the binding types a point id as (this adapter writes ints)
HIT_FIELDS_CAPACITY = 100_000  # points per searched collection; ~400 bytes each
SIZE_CHECK_S = 5.0  # how often a searched collection without one is checked against that size


class HitFields:
    """A collection's ranking fields (``RANKING_FIELDS``) by point id, least recently used leaving first.

    Exact, not time-limited: every write to the shard goes through this process (Qdrant Edge locks
    it), and each write drops the points it touches. A fetch that overlapped a write is used for
    its search but not kept, so a fetch cannot put back what a write just replaced.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # point id → the fields, shared by every hit of the point (so built once, but never to be changed)
        self._entries: OrderedDict[EdgePointId, dict[str, Any]] = OrderedDict()
        self._writes = 0
        self._lock = threading.Lock()  # searches and catalogue writes run on different threads

    def hits(
        self, shard: edge.EdgeShard, scored: Sequence[Sequence[tuple[EdgePointId, float]]]
    ) -> list[list[SearchHit]]:
        """Search results (point ids and scores) as hits; a point deleted since the search drops out."""
        ids = {i for points in scored for i, _ in points}
        with self._lock:
            known = {}
            for point_id_ in ids:
                fields = self._entries.get(point_id_)
                if fields is not None:
                    self._entries.move_to_end(point_id_)
                    known[point_id_] = fields
            writes = self._writes
        missing = list(ids - known.keys())
        if missing:
            records = shard.retrieve(missing, with_payload=RANKING_FIELDS, with_vector=False)
            fetched = {r.id: {f: payload.get(f) for f in RANKING_FIELDS} for r in records if (payload := r.payload)}
            known.update(fetched)
            with self._lock:
                if self._writes == writes:
                    self._entries.update(fetched)
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
        return [
            [
                SearchHit(fields[EXTERNAL_ID] or str(i), score, fields)
                for i, score in points
                if (fields := known.get(i)) is not None
            ]
            for points in scored
        ]

    def written(self, point_ids: Iterable[EdgePointId]) -> None:
        with self._lock:
            self._writes += 1
            for point_id_ in point_ids:
                self._entries.pop(point_id_, None)


class EdgeVectorStore:
    """Embedded Qdrant: the Qdrant engine (Qdrant Edge) in the worker's process, one shard per collection
    in a folder of its own. One process holds the folder at a time."""

    def __init__(
        self,
        path: Path,
        *,
        search_threads: int = 1,
        search_ef: int = 0,
        lock_wait_s: float = LOCK_WAIT_S,
        native_from: int = 0,
    ) -> None:
        """``native_from``: collections searched with at least this many points are searched through a native
        index mirroring them (``streams.stores.native_index``; 0: never)."""
        self._path = path
        self._lock_wait_s = lock_wait_s
        self._search_ef = search_ef
        self._search_params = edge.SearchParams(hnsw_ef=search_ef) if search_ef else None
        self._search_threads = search_threads  # one worker process per core: no thread pool per search
        self._shards: dict[str, edge.EdgeShard] = {}
        self._dims: dict[str, int] = {}
        self._hit_fields: dict[str, HitFields] = {}  # of the collections searched so far
        self._lock = threading.Lock()  # guards the shard map, not the shards (they are thread-safe)
        self._native_from = native_from
        self._mirrors: dict[str, IndexMirror] = {}
        self._next_size_check: dict[str, float] = {}
        # Held by every write from finding the collection's mirror to updating it, and by a mirror's start:
        # a write either sees the mirror (and updates it under its lock) or lands before its build reads.
        self._write_lock = threading.Lock()

    def _shard(self, collection: str) -> edge.EdgeShard:
        try:
            return self._shards[collection]
        except KeyError:
            raise VectorStoreError(f"collection {collection!r} is not open (ensure_collection first)") from None

    def ensure_collection(self, name: str, dim: int) -> None:
        with self._lock:
            if name not in self._shards:
                self._shards[name] = self._open(name, dim)
            elif self._dims[name] != dim:
                raise _other_model(name, f"{self._dims[name]}-d vectors ranked by Dot", dim)
            shard = self._shards[name]
        info = shard.info()
        if info.points_count - info.indexed_vectors_count > INDEX_WHEN_UNINDEXED:
            self.build_index(name)

    def _open(self, name: str, dim: int) -> edge.EdgeShard:
        folder = self._path / name
        config = edge.EdgeConfig(
            vectors=edge.EdgeVectorParams(size=dim, distance=edge.Distance.Dot),
            max_search_threads=self._search_threads,
        )
        deadline = time.monotonic() + self._lock_wait_s
        backoff = 0.1
        while True:
            try:
                if folder.exists() and any(folder.iterdir()):
                    shard = edge.EdgeShard.load(str(folder), config)  # checks the stored vectors against config
                else:
                    shard = edge.EdgeShard.create(str(folder), config)
                break
            except Exception as exc:  # the binding raises plain Exception with Qdrant's message
                stored = re.search(
                    r"expected vector size \d+, but got (\d+)|expected distance \w+, but got (\w+)", str(exc)
                )
                if stored:
                    held = f"{stored[1]}-d vectors" if stored[1] else f"{dim}-d vectors ranked by {stored[2]}"
                    raise _other_model(name, held, dim) from None
                if "WouldBlock" not in str(exc):
                    raise VectorStoreError(f"embedded Qdrant at {folder} is unavailable: {exc}") from None
                if time.monotonic() + backoff > deadline:
                    raise VectorStoreError(
                        f"embedded Qdrant at {folder} stayed locked by another process for {self._lock_wait_s:.0f} s: "
                        "each worker needs its own RTREC_QDRANT_PATH (workers can share a Qdrant server instead)"
                    ) from None
                log.warning("embedded Qdrant at %s is locked by another process; retrying in %.1f s", folder, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_LOCK_BACKOFF_S)
        self._dims[name] = dim
        return shard

    def build_index(self, collection: str) -> None:
        shard = self._shard(collection)
        info = shard.info()
        log.info("indexing %s: %d points, %d indexed", collection, info.points_count, info.indexed_vectors_count)
        shard.optimize()

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        if not points:
            return
        ids = point_ids(p.id for p in points)
        vectors = np.stack([np.asarray(p.vector, dtype=np.float32) for p in points])
        operation = edge.UpdateOperation.upsert_points(
            [
                edge.Point(i, vector, {**p.payload, EXTERNAL_ID: p.id})
                for i, vector, p in zip(ids, vectors.tolist(), points, strict=True)
            ]
        )
        self._update(collection, operation, ids, vectors)

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            points = point_ids(ids)
            targets: list[EdgePointId] = [*points]  # the binding's parameter type
            self._update(collection, edge.UpdateOperation.delete_points(targets), points)

    def _update(
        self,
        collection: str,
        operation: edge.UpdateOperation,
        point_ids: list[int],
        vectors: np.ndarray | None = None,
    ) -> None:
        """Apply a write to the shard and to its native index, if it has one (``vectors``: an upsert's)."""
        shard = self._shard(collection)
        with self._write_lock:
            mirror = self._mirrors.get(collection)
            with mirror.lock if mirror is not None else contextlib.nullcontext():
                try:
                    shard.update(operation)
                finally:
                    # After the write: a fetch that read the old fields began before this, so it goes uncached.
                    fields = self._hit_fields.get(collection)
                    if fields is not None:
                        fields.written(point_ids)
                if mirror is not None:
                    if vectors is None:
                        mirror.index.remove(point_ids)
                    else:
                        mirror.index.put(point_ids, vectors)

    def fetch_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        unique = list(dict.fromkeys(ids))
        records = self._shard(collection).retrieve([*point_ids(unique)], with_payload=[EXTERNAL_ID], with_vector=True)
        return {
            str(r.payload[EXTERNAL_ID]): np.asarray(r.vector, dtype=np.float32)
            for r in records
            if r.payload and isinstance(r.vector, list)
        }

    def fetch_payloads(self, collection: str, ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        unique = list(dict.fromkeys(ids))
        records = self._shard(collection).retrieve(
            [*point_ids(unique)], with_payload=[EXTERNAL_ID, *fields], with_vector=False
        )
        return {
            str(payload[EXTERNAL_ID]): {f: payload.get(f) for f in fields}
            for payload in (r.payload for r in records)
            if payload
        }

    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        shard = self._shard(collection)
        with self._lock:
            fields = self._hit_fields.setdefault(collection, HitFields(HIT_FIELDS_CAPACITY))
        mirror = self._mirror(collection, shard)

        def fetch(batch: Sequence[tuple[SearchQuery, int]]) -> list[list[SearchHit]]:
            # Business rules and searches among given ids stay with Qdrant; the rest goes to the native index.
            native = [i for i, (q, _) in enumerate(batch) if mirror is not None and _native_kind(q)]
            scored: list[list[tuple[EdgePointId, float]]] = [[] for _ in batch]
            if mirror is not None and native:
                for i, found in zip(native, mirror.search([batch[i] for i in native]), strict=True):
                    scored[i] = list(found)
            on_qdrant = sorted(set(range(len(batch))) - set(native))
            if on_qdrant:
                responses = shard.query_batch(edge.QueryBatchRequest([self._request(*batch[i]) for i in on_qdrant]))
                for i, points in zip(on_qdrant, responses, strict=True):
                    scored[i] = [(point.id, point.score) for point in points]  # each read crosses into Rust
            return fields.hits(shard, scored)

        return rank_without_unavailable(queries, fetch)

    def _request(self, query: SearchQuery, limit: int) -> edge.QueryRequest:
        return edge.QueryRequest(
            limit=limit,
            query=edge.Query.Nearest(_floats(query.vector)),
            filter=_filter(query),
            with_payload=False,
            params=self._search_params,
        )

    def _mirror(self, collection: str, shard: edge.EdgeShard) -> IndexMirror | None:
        """The collection's native index once built; a collection big enough gets one started (in the background)."""
        mirror = self._mirrors.get(collection)
        if mirror is not None:
            return mirror if mirror.ready else None
        now = time.monotonic()
        if not self._native_from or now < self._next_size_check.get(collection, 0.0):
            return None
        self._next_size_check[collection] = now + SIZE_CHECK_S
        if shard.info().points_count < self._native_from:
            return None

        def read_chunk(offset: EdgePointId | None) -> tuple[list[edge.Record], EdgePointId | None]:
            return shard.scroll(edge.ScrollRequest(offset=offset, limit=BUILD_CHUNK, with_vector=True))

        with self._write_lock:
            mirror = IndexMirror(collection, self._dims[collection], self._search_ef, read_chunk)
            self._mirrors[collection] = mirror
        mirror.start()
        return None

    def native_ready(self, collection: str, timeout_s: float) -> bool:
        """Start the collection's native index if it is big enough and wait up to ``timeout_s`` for its build:
        whether searches now go through it."""
        self._next_size_check.pop(collection, None)
        self._mirror(collection, self._shard(collection))
        mirror = self._mirrors.get(collection)
        return mirror is not None and mirror.wait_ready(timeout_s)

    def drop_collection(self, name: str) -> None:
        self._stop_mirror(name)
        with self._lock:
            shard = self._shards.pop(name, None)
            self._dims.pop(name, None)
            self._hit_fields.pop(name, None)
            if shard is not None:
                shard.close()
            shutil.rmtree(self._path / name, ignore_errors=True)

    def _stop_mirror(self, collection: str) -> None:
        with self._write_lock:
            mirror = self._mirrors.pop(collection, None)
            self._next_size_check.pop(collection, None)
        if mirror is not None:
            mirror.stop()

    def close(self) -> None:
        for name in list(self._mirrors):
            self._stop_mirror(name)
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()


def _native_kind(query: SearchQuery) -> bool:
    return query.item_filter is None and query.only_ids is None


def _floats(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).tolist()  # type: ignore[no-any-return]


def _other_model(name: str, held: str, dim: int) -> VectorStoreError:
    return VectorStoreError(
        f"collection {name!r} holds {held}; the model makes {dim}-d vectors ranked by Dot "
        "(a different model: delete the collection to re-embed)"
    )


def _filter(query: SearchQuery) -> edge.Filter | None:
    must: list[edge.ConditionType] = []
    must_not: list[edge.ConditionType] = []
    if query.exclude_ids:
        must_not.append(edge.HasIdCondition(set(point_ids(query.exclude_ids))))
    if query.only_ids is not None:
        must.append(edge.HasIdCondition(set(point_ids(query.only_ids))))
    rules = query.item_filter
    if rules is not None:
        if rules.categories:
            must.append(edge.FieldCondition("category", match=edge.MatchAny(list(rules.categories))))
        if rules.exclude_categories:
            must_not.append(edge.FieldCondition("category", match=edge.MatchAny(list(rules.exclude_categories))))
        if rules.min_price is not None or rules.max_price is not None:
            must.append(edge.FieldCondition("price", range=edge.RangeFloat(gte=rules.min_price, lte=rules.max_price)))
    if not must and not must_not:
        return None
    return edge.Filter(must=must or None, must_not=must_not or None)
