"""A vector store that rides out outages: the stream pauses instead of dropping events.

Every data-path call (upsert, delete, fetch, search) is retried with exponential
backoff, capped at ``max_backoff_s`` between attempts, until it succeeds or the
worker stops. While it retries, the micro-batch is not finished, so its offsets
are not committed: the partition pauses, ``rtrec_consumer_lag`` grows, each failure
counts in ``rtrec_vector_store_errors``, and the stream resumes where it stood
when the store answers again. Opening a collection is not retried: a store that
holds another model's vectors is a configuration error, not an outage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from streams.errors import VectorStoreError
from streams.metrics import WorkerMetrics
from streams.ports import SearchHit, SearchQuery, VectorPoint, VectorStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class RetryingVectorStore:
    """Any ``VectorStore``, every call retried with exponential backoff while the store is away, so an
    outage pauses the stream instead of failing it; ``stop_retrying`` lets a stopping worker go."""

    def __init__(
        self,
        inner: VectorStore,
        metrics: WorkerMetrics,
        *,
        first_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._stopping = threading.Event()

    def _call(self, operation: str, call: Callable[[], T]) -> T:
        backoff = self.first_backoff_s
        attempt = 1
        while True:
            try:
                return call()
            except Exception as exc:  # the clients raise their own transport errors; all mean "not now"
                self.metrics.store_errors.labels(operation).inc()
                log.warning(
                    "vector store %s failed (attempt %d, %s: %s); retrying in %.1f s",
                    operation,
                    attempt,
                    type(exc).__name__,
                    str(exc)[:200],
                    backoff,
                )
            if self._stopping.wait(backoff):
                raise VectorStoreError(f"vector store {operation} abandoned: the worker is stopping")
            backoff = min(backoff * 2, self.max_backoff_s)
            attempt += 1

    def stop_retrying(self) -> None:
        """Calls still retrying give up (with ``VectorStoreError``), so a stopping worker is not held up."""
        self._stopping.set()

    def ensure_collection(self, name: str, dim: int) -> None:
        self.inner.ensure_collection(name, dim)

    def build_index(self, collection: str) -> None:
        self.inner.build_index(collection)

    def drop_collection(self, name: str) -> None:
        self._call("drop", lambda: self.inner.drop_collection(name))

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        self._call("upsert", lambda: self.inner.upsert(collection, points))

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        self._call("delete", lambda: self.inner.delete(collection, ids))

    def fetch_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return self._call("fetch", lambda: self.inner.fetch_vectors(collection, ids))

    def fetch_payloads(self, collection: str, ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self._call("fetch", lambda: self.inner.fetch_payloads(collection, ids, fields))

    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        return self._call("search", lambda: self.inner.search_batch(collection, queries))

    def close(self) -> None:
        self.stop_retrying()
        self.inner.close()
