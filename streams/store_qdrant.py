"""Qdrant behind the ``VectorStore`` interface: embedded local mode or a server, one code path.

External string ids map to deterministic UUIDs (uuid5), with the original id
kept in the payload under ``ext_id``. Collections rank by dot product, as the model scores.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models

from streams.errors import VectorStoreError
from streams.ports import SearchHit, SearchQuery, VectorPoint
from streams.settings import Settings

ID_NAMESPACE = uuid.UUID("6f1d9a8e-2b7c-4d0e-9a51-3c8f0e2d7b64")
EXTERNAL_ID = "ext_id"


P = ParamSpec("P")
R = TypeVar("R")


# The interest encoder scores items by dot product (it is trained that way): the store ranks alike.
DISTANCE = models.Distance.DOT


def point_id(external_id: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, external_id))


def _serialized(
    method: Callable[Concatenate[QdrantVectorStore, P], R],
) -> Callable[Concatenate[QdrantVectorStore, P], R]:
    @functools.wraps(method)
    def guarded(self: QdrantVectorStore, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._guard:
            return method(self, *args, **kwargs)

    return guarded


class QdrantVectorStore:
    def __init__(self, client: QdrantClient, *, server: bool, prefix: str = "") -> None:
        self._client = client
        self._server = server  # payload indexes exist only on a server
        self._prefix = prefix  # lets several pipelines (or tests) share one Qdrant
        # The worker calls the store from two threads (events, catalogue). Local mode is plain
        # Python state and one SQLite connection and is not documented as thread-safe, so its
        # calls take turns (a stress run without the lock showed no failure, so no test pins it).
        self._guard: AbstractContextManager[object] = contextlib.nullcontext() if server else threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> QdrantVectorStore:
        if settings.qdrant_url:
            key = settings.qdrant_api_key.reveal() if settings.qdrant_api_key else None
            return cls(QdrantClient(url=settings.qdrant_url, api_key=key, timeout=30), server=True)
        path = Path(settings.qdrant_local_path)
        path.mkdir(parents=True, exist_ok=True)
        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as exc:  # qdrant-client's message when another process holds the folder
            raise VectorStoreError(f"embedded Qdrant at {path} is unavailable: {exc}") from None
        return cls(client, server=False)

    def _name(self, collection: str) -> str:
        return self._prefix + collection

    @_serialized
    def ensure_collection(self, name: str, dim: int) -> None:
        full = self._name(name)
        if self._client.collection_exists(full):
            params = self._client.get_collection(full).config.params.vectors
            existing = (getattr(params, "size", None), getattr(params, "distance", None))
            if existing != (dim, DISTANCE):
                raise VectorStoreError(
                    f"collection {full!r} holds {existing[0]}-d vectors ranked by {existing[1]}; the model makes "
                    f"{dim}-d vectors ranked by {DISTANCE} (a different model: delete the collection to re-embed)"
                )
            return
        self._client.create_collection(full, vectors_config=models.VectorParams(size=dim, distance=DISTANCE))
        if self._server:
            self._client.create_payload_index(full, "available", models.PayloadSchemaType.BOOL)

    @_serialized
    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        if not points:
            return
        self._client.upsert(
            self._name(collection),
            points=[
                models.PointStruct(
                    id=point_id(p.id),
                    vector=np.asarray(p.vector, dtype=np.float32).tolist(),
                    payload={**p.payload, EXTERNAL_ID: p.id},
                )
                for p in points
            ],
            wait=True,
        )

    @_serialized
    def delete(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            self._client.delete(self._name(collection), points_selector=[point_id(i) for i in ids], wait=True)

    @_serialized
    def fetch_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        unique = list(dict.fromkeys(ids))
        records = self._client.retrieve(
            self._name(collection), ids=[point_id(i) for i in unique], with_vectors=True, with_payload=[EXTERNAL_ID]
        )
        return {
            str((r.payload or {})[EXTERNAL_ID]): np.asarray(r.vector, dtype=np.float32)
            for r in records
            if r.payload and r.vector is not None
        }

    @_serialized
    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        if not queries:
            return []
        if not self._server:
            return [self._search_local(collection, q) for q in queries]
        responses = self._client.query_batch_points(
            self._name(collection),
            requests=[
                models.QueryRequest(
                    query=np.asarray(q.vector, dtype=np.float32).tolist(),
                    limit=q.limit,
                    filter=_filter(q),
                    with_payload=_RANKING_FIELDS,
                    with_vector=False,
                )
                for q in queries
            ],
        )
        return [[_hit(p) for p in response.points] for response in responses]

    def _search_local(self, collection: str, query: SearchQuery) -> list[SearchHit]:
        """Local mode evaluates payload filters point by point in Python (~25 ms a query at 1k points)
        and deep-copies batch requests, so: one plain query each, over-fetched without a filter, and
        the same exclusions applied to the ranked hits."""
        excluded = set(query.exclude_ids)
        fetch = query.limit + len(excluded) + 8
        while True:
            response = self._client.query_points(
                self._name(collection),
                query=np.asarray(query.vector, dtype=np.float32).tolist(),
                limit=fetch,
                with_payload=_RANKING_FIELDS,
            )
            hits = [_hit(p) for p in response.points]
            kept = [h for h in hits if h.id not in excluded and not (query.only_available and _unavailable(h))]
            if len(kept) >= query.limit or len(hits) < fetch:
                return kept[: query.limit]
            fetch *= 2

    @_serialized
    def close(self) -> None:
        self._client.close()


# Ranking needs only these; local mode deep-copies whatever a search returns.
_RANKING_FIELDS = [EXTERNAL_ID, "available"]


def _hit(point: models.ScoredPoint) -> SearchHit:
    return SearchHit(
        id=str((point.payload or {}).get(EXTERNAL_ID, point.id)), score=float(point.score), payload=point.payload or {}
    )


def _unavailable(hit: SearchHit) -> bool:
    return hit.payload.get("available") is False


def _filter(query: SearchQuery) -> models.Filter | None:
    must_not: list[Any] = []
    if query.exclude_ids:
        must_not.append(models.HasIdCondition(has_id=[point_id(i) for i in query.exclude_ids]))
    if query.only_available:
        must_not.append(models.FieldCondition(key="available", match=models.MatchValue(value=False)))
    return models.Filter(must_not=must_not) if must_not else None
