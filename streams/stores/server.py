"""A Qdrant server behind the ``VectorStore`` interface (the production store).

External string ids map to 64-bit point ids, with the original id kept in the
payload under ``ext_id`` (``streams.stores.search``, shared with the embedded
store). Collections rank by dot product, as the model scores.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from streams.errors import VectorStoreError
from streams.ports import SearchHit, SearchQuery, VectorPoint
from streams.stores.search import EXTERNAL_ID, RANKING_FIELDS, point_id, point_ids, rank_without_unavailable

# The interest encoder scores items by dot product (it is trained that way): the store ranks alike.
DISTANCE = models.Distance.DOT


@dataclass(frozen=True)
class Replication:
    """How the collections this store creates are spread over a Qdrant cluster (1, 1, 1 on one server)."""

    shards: int = 1
    replication_factor: int = 1  # copies of each shard: 2 survives the loss of a node
    write_consistency_factor: int = 1  # copies that must confirm a write before it is acknowledged


class QdrantVectorStore:
    """A Qdrant server (or cluster) through qdrant-client: the store several workers share."""

    def __init__(
        self,
        client: QdrantClient,
        *,
        prefix: str = "",
        search_ef: int = 0,
        url: str = "",
        replication: Replication = Replication(),
    ) -> None:
        self._client = client
        self._replication = replication
        self._search_params = models.SearchParams(hnsw_ef=search_ef) if search_ef else None
        self._prefix = prefix  # lets several pipelines (or tests) share one Qdrant
        self._url = url or "the Qdrant server"

    @classmethod
    def connect(
        cls,
        url: str,
        api_key: str | None = None,
        search_ef: int = 0,
        verify: ssl.SSLContext | bool = True,
        replication: Replication = Replication(),
        grpc_port: int = 0,
        ca_pem: bytes | None = None,
    ) -> QdrantVectorStore:
        """``verify``: how an https server's certificate is checked (passed to the HTTP client);
        ``grpc_port``: every call over gRPC on that port, with ``ca_pem`` (the CA's certificate) trusted
        for TLS; 0: REST on the URL's port."""
        # No version check: it runs on a thread of its own and, against a server that refuses the key or
        # the certificate, only warns from there; ensure_collection says what is wrong instead.
        client = QdrantClient(
            url=url,
            api_key=api_key,
            timeout=30,
            verify=verify,
            check_compatibility=False,
            prefer_grpc=bool(grpc_port),
            grpc_port=grpc_port or 6334,
            grpc_options={"root_certificates": ca_pem} if grpc_port and ca_pem else None,
        )
        return cls(client, search_ef=search_ef, url=url, replication=replication)

    def _name(self, collection: str) -> str:
        return self._prefix + collection

    def ensure_collection(self, name: str, dim: int) -> None:
        full = self._name(name)
        with self._explained():
            if not self._client.collection_exists(full):
                self._create(full, dim)
            params = self._client.get_collection(full).config.params.vectors
            existing = (getattr(params, "size", None), getattr(params, "distance", None))
            if existing != (dim, DISTANCE):
                raise VectorStoreError(
                    f"collection {full!r} holds {existing[0]}-d vectors ranked by {existing[1]}; the model makes "
                    f"{dim}-d vectors ranked by {DISTANCE} (a different model: delete the collection to re-embed)"
                )

    def _create(self, full: str, dim: int) -> None:
        """Create the collection; one that another worker created meanwhile is no error (workers that start
        together against one server all find it missing, and all but one are refused its creation)."""
        try:
            self._client.create_collection(
                full,
                vectors_config=models.VectorParams(size=dim, distance=DISTANCE),
                shard_number=self._replication.shards,
                replication_factor=self._replication.replication_factor,
                write_consistency_factor=self._replication.write_consistency_factor,
            )
        except UnexpectedResponse as exc:
            if exc.status_code != 409:
                raise
        except grpc.RpcError as exc:
            if "already exists" not in (cast(grpc.Call, exc).details() or ""):
                raise

    @contextmanager
    def _explained(self) -> Iterator[None]:
        """A server that cannot be reached or refuses the key, as one line naming the setting to check.

        Only where a collection is opened: on the data path, failures are retried (``store_retry``).
        """
        try:
            yield
        except UnexpectedResponse as exc:
            if exc.status_code not in (401, 403):
                raise
            raise VectorStoreError(
                f"Qdrant at {self._url} refused the request ({exc.status_code} {exc.reason_phrase}): "
                "RTREC_QDRANT_API_KEY must be a key it accepts"
            ) from None
        except grpc.RpcError as exc:
            code, details = cast(grpc.Call, exc).code(), cast(grpc.Call, exc).details()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise VectorStoreError(
                    f"Qdrant at {self._url} refused the request ({code.name} over gRPC): "
                    "RTREC_QDRANT_API_KEY must be a key it accepts"
                ) from None
            hint = " (RTREC_QDRANT_CA_CERT must name the CA that signed the server's certificate)"
            raise VectorStoreError(
                f"Qdrant at {self._url} is unreachable over gRPC (RTREC_QDRANT_GRPC_PORT): {code.name} {details}"
                + (hint if "certificate" in (details or "").lower() or "handshake" in (details or "").lower() else "")
            ) from None
        except ResponseHandlingException as exc:
            reason = str(exc.source) or type(exc.source).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason:
                raise VectorStoreError(
                    f"the TLS handshake with Qdrant at {self._url} failed: {reason} "
                    "(RTREC_QDRANT_CA_CERT must name the CA that signed the server's certificate)"
                ) from None
            raise VectorStoreError(f"Qdrant at {self._url} is unreachable: {reason}") from None

    def build_index(self, collection: str) -> None:
        """The server indexes in the background by itself."""

    def drop_collection(self, name: str) -> None:
        self._client.delete_collection(self._name(name))

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

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            self._client.delete(self._name(collection), points_selector=[*point_ids(ids)], wait=True)

    def fetch_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        unique = list(dict.fromkeys(ids))
        records = self._client.retrieve(
            self._name(collection), ids=[*point_ids(unique)], with_vectors=True, with_payload=[EXTERNAL_ID]
        )
        return {
            str((r.payload or {})[EXTERNAL_ID]): np.asarray(r.vector, dtype=np.float32)
            for r in records
            if r.payload and r.vector is not None
        }

    def fetch_payloads(self, collection: str, ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        unique = list(dict.fromkeys(ids))
        records = self._client.retrieve(
            self._name(collection),
            ids=[*point_ids(unique)],
            with_vectors=False,
            with_payload=[EXTERNAL_ID, *fields],
        )
        return {
            str(payload[EXTERNAL_ID]): {f: payload.get(f) for f in fields}
            for payload in (r.payload for r in records)
            if payload
        }

    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        def fetch(batch: Sequence[tuple[SearchQuery, int]]) -> list[list[SearchHit]]:
            responses = self._client.query_batch_points(
                self._name(collection),
                requests=[
                    models.QueryRequest(
                        query=np.asarray(q.vector, dtype=np.float32).tolist(),
                        limit=limit,
                        filter=_filter(q),
                        with_payload=RANKING_FIELDS,
                        with_vector=False,
                        params=self._search_params,
                    )
                    for q, limit in batch
                ],
            )
            return [[_hit(p) for p in response.points] for response in responses]

        return rank_without_unavailable(queries, fetch) if queries else []

    def close(self) -> None:
        self._client.close()


def _hit(point: models.ScoredPoint) -> SearchHit:
    return SearchHit(
        id=str((point.payload or {}).get(EXTERNAL_ID, point.id)), score=float(point.score), payload=point.payload or {}
    )


def _filter(query: SearchQuery) -> models.Filter | None:
    must: list[models.Condition] = []
    must_not: list[models.Condition] = []
    if query.exclude_ids:
        must_not.append(models.HasIdCondition(has_id=[*point_ids(query.exclude_ids)]))
    if query.only_ids is not None:
        must.append(models.HasIdCondition(has_id=[*point_ids(query.only_ids)]))
    rules = query.item_filter
    if rules is not None:
        if rules.categories:
            must.append(models.FieldCondition(key="category", match=models.MatchAny(any=list(rules.categories))))
        if rules.exclude_categories:
            must_not.append(
                models.FieldCondition(key="category", match=models.MatchAny(any=list(rules.exclude_categories)))
            )
        if rules.min_price is not None or rules.max_price is not None:
            must.append(
                models.FieldCondition(key="price", range=models.Range(gte=rules.min_price, lte=rules.max_price))
            )
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)
