"""The small interfaces between the steps of the pipeline, and the contracts they keep.

The worker is wired with implementations of these (``streams.worker.app.build_app``): the
ONNX Runtime encoders and a Qdrant store in production. Each Protocol lists only what the
stream calls, and each has one contract suite that every implementation passes:
``tests/test_encoder_runtime.py`` for the encoder runtimes, ``tests/test_vector_store.py``
for the vector stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from encoder.features import EncoderInputs, EventTypeVocabulary
from streams.fusion import Fusion


class TextEmbedder(Protocol):
    """The pretrained text encoder: item text to the vectors the item tower reads."""

    dim: int
    version: str
    provider: str

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """[n, dim] float32 unit vectors."""
        ...


class InterestEncoderRuntime(Protocol):
    """The model's user tower: a batch of windows to user vectors in the item tower's space.

    Contract: a window's vector is the exported model's within the precision's tolerance
    (``encoder.export``), and does not depend on what it is batched with (float precisions to
    rounding; int8 within its tolerance, its activations being quantized per call).
    """

    dim: int
    version: str
    provider: str
    precision: str  # fp32, fp16 or int8: the user tower actually loaded
    max_len: int  # newest events of a window the model reads
    interests: int  # user vectors per window
    fusion: Fusion  # how its scores are fused with live co-occurrence (chosen with the model)

    @property
    def vocabulary(self) -> EventTypeVocabulary:
        """The loaded model's event types (an unknown type has an id of its own)."""
        ...

    def encode_batch(self, inputs: EncoderInputs) -> np.ndarray:
        """[batch, dim] float32 user vectors, or [batch, interests, dim]; items rank by dot product with them."""
        ...


class CooccurrenceScores(Protocol):
    """Which items go with a user's newest ones, counted from the stream (``streams.cooccurrence``)."""

    def scores(
        self, recent: Sequence[str], depth: int, exclude: Iterable[str] = (), damping: float = 0.0
    ) -> list[tuple[str, float, str]]:
        """The ``depth`` best items for a user whose items are ``recent`` (newest last), not in ``exclude``:
        (item, score, the recent item it goes with most), best first; ``damping`` lifts rarely seen items."""
        ...


class ItemEncoderRuntime(Protocol):
    """The model's item tower: places items (known ids, and new ones by their text) in its space."""

    dim: int
    version: str
    tower_id: str  # names the space its vectors live in: equal ids, equal vectors for equal input
    text_dim: int  # the text vectors it reads (0: ids only)

    @property
    def reads_text(self) -> bool: ...

    def knows(self, item_id: str) -> bool:
        """Whether the model learned this item's id (an id-only model can place no other)."""
        ...

    def encode_batch(self, item_ids: Sequence[str], text_vectors: np.ndarray | None = None) -> np.ndarray:
        """[n, dim] float32 item vectors."""
        ...


@dataclass(frozen=True)
class VectorPoint:
    """A vector to write, under its external id, with its payload."""

    id: str  # the external id (item_id / user_id)
    vector: np.ndarray
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemFilter:
    """Rules on the items' payload, applied by the store's own filter (an item without a price
    fails a price bound)."""

    categories: tuple[str, ...] = ()  # only items of one of these categories (empty: any)
    exclude_categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None

    def admits(self, payload: Mapping[str, Any]) -> bool:
        """Whether an item's payload passes, as the stores' payload filters decide it in a search."""
        category, price = payload.get("category"), payload.get("price")
        if self.categories and category not in self.categories:
            return False
        if category in self.exclude_categories:
            return False
        if self.min_price is not None and (price is None or price < self.min_price):
            return False
        return not (self.max_price is not None and (price is None or price > self.max_price))

    def narrowed_by(self, request: ItemFilter | None) -> ItemFilter:
        """This filter and ``request`` at once: a request can only narrow standing rules."""
        if request is None:
            return self
        excluded = set(self.exclude_categories) | set(request.exclude_categories)
        if request.categories and self.categories:
            excluded |= set(request.categories) - set(self.categories)  # asked for, but not allowed
        bounds_low = [p for p in (self.min_price, request.min_price) if p is not None]
        bounds_high = [p for p in (self.max_price, request.max_price) if p is not None]
        return ItemFilter(
            categories=request.categories or self.categories,
            exclude_categories=tuple(sorted(excluded)),
            min_price=max(bounds_low, default=None),
            max_price=min(bounds_high, default=None),
        )


@dataclass(frozen=True)
class SearchQuery:
    """One search of ``VectorStore.search_batch`` (see its contract)."""

    vector: np.ndarray
    limit: int
    exclude_ids: Sequence[str] = ()
    only_available: bool = True
    item_filter: ItemFilter | None = None
    only_ids: Sequence[str] | None = None  # rank these items alone (e.g. co-occurrence's candidates); None: all


@dataclass(slots=True)  # not frozen: a search builds tens of thousands a batch, and frozen ones cost 3x as much
class SearchHit:
    """One result of a search: the item's external id, its dot product with the query, its payload."""

    id: str
    score: float
    payload: dict[str, Any]  # at least "available" when the item has it; read-only (hits of an item may share it)


class VectorStore(Protocol):
    """Collections of vectors under external string ids, with their payloads, searched by dot product.

    Every call is retried by ``streams.stores.retry`` when the store is away; an implementation
    raises ``VectorStoreError`` for that and for nothing else it can recover from.
    """

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection (dot-product vectors of ``dim``) unless it exists; idempotent."""
        ...

    def build_index(self, collection: str) -> None:
        """Index what was written so far (after a bulk load); blocks searches while it runs."""
        ...

    def drop_collection(self, name: str) -> None:
        """Delete a collection and everything in it (a missing one is no error)."""
        ...

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        """Write the points; an existing id is replaced, vector and payload. Visible to the next call."""
        ...

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        """Remove the ids; unknown ids are no error."""
        ...

    def fetch_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of the ids that exist; unknown ids are absent from the result."""
        ...

    def fetch_payloads(self, collection: str, ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The given payload fields of the ids that exist; unknown ids are absent from the result."""
        ...

    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        """One list of hits per query, in the queries' order. Each list holds at most ``limit`` hits,
        highest dot product with the query's vector first (the score), and never an id of
        ``exclude_ids``, an item whose payload says ``available: false`` when ``only_available``, one
        the ``item_filter`` does not admit (``ItemFilter.admits``), or one outside ``only_ids`` when
        given. Each hit's payload holds at least ``available`` where the item has it. An approximate
        index may miss a true neighbour (``rtrec bench`` reports the recall), never break these rules."""
        ...

    def close(self) -> None:
        """Release the store (files, locks, connections); the object is not used afterwards."""
        ...
