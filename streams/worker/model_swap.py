"""Model updates without downtime: a new bundle in the model folder is picked up, prepared and switched to.

Every ``RTREC_MODEL_RELOAD_S`` the worker reads the version in the interest encoder's
manifest. When it differs from the model being served:

1. the new bundle is loaded (its checksums verified: a bundle still being copied is
   tried again at the next look) and checked against what it must fit;
2. if its item tower differs, the new tower's collection is filled in the background:
   from then on the catalogue agent writes every change for both towers, and the
   catalogue topic is re-embedded up to its end offsets of that moment, skipping the
   items the agent has written from past them (``CatalogBatchProcessor``);
3. the switch: the events thread takes the new encoder and collection between two
   micro-batches, then the catalogue thread writes for the new tower only. Every
   recommendation names the model that made it, so consumers see the switch as it happens;
4. the old tower's collection is dropped from an embedded store. A Qdrant server's
   collections are shared: there every worker fills the new one (upserts of the same
   vectors) and the old one is left for workers still serving from it.

Replace a bundle by renaming a complete folder over it; a model whose vector size differs
from the users collection's cannot be swapped in live (restart with a new collection).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from encoder.config import INTEREST_BUNDLE, BundleManifest
from streams.errors import ModelError
from streams.item_vectors import ItemEmbedder, ItemVectorCache
from streams.metrics import WorkerMetrics
from streams.pipeline import CatalogBatchProcessor, ItemTarget, Migration
from streams.ports import InterestEncoderRuntime, ItemEncoderRuntime, TextEmbedder, VectorStore
from streams.recommend import Recommender
from streams.settings import Settings
from streams.worker.catalog_sync import catalogue_ends, items_collection_name, latest, read_catalog

log = logging.getLogger(__name__)

Loader = Callable[[Settings], tuple[InterestEncoderRuntime, ItemEncoderRuntime]]


def served_model_info(interest: InterestEncoderRuntime, items: ItemEncoderRuntime) -> dict[str, Any]:
    """The served model as `GET /model` describes it."""
    return {
        "interest_encoder": {
            "version": interest.version,
            "provider": interest.provider,
            "precision": interest.precision,
            "dim": interest.dim,
            "max_len": interest.max_len,
            "interests": interest.interests,
        },
        "item_tower": {"version": items.version, "reads_text": items.reads_text, "tower_id": items.tower_id},
    }


class ModelSwapper:
    """Watches the model folder and swaps a new interest-encoder bundle in between two micro-batches,
    after filling its item tower's collection in the background."""

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        text_embedder: TextEmbedder,
        recommender: Recommender,
        catalog: CatalogBatchProcessor,
        *,
        event_worker: ThreadPoolExecutor,
        catalog_worker: ThreadPoolExecutor,
        load: Loader,
        metrics: WorkerMetrics,
        info: MutableMapping[str, Any],
    ) -> None:
        self.settings = settings
        self.store = store
        self.text_embedder = text_embedder
        self.recommender = recommender
        self.catalog = catalog
        self.event_worker = event_worker
        self.catalog_worker = catalog_worker
        self.load = load
        self.metrics = metrics
        self.info = info  # what `GET /model` answers, kept current
        self.refused: set[str] = set()  # versions that cannot be served: not tried again
        self.failed: str | None = None  # the version last failed to load (said once, tried again)

    @property
    def _owns_store(self) -> bool:
        """An embedded store is this worker's alone; the collections of a Qdrant server are shared by all workers."""
        return not self.settings.qdrant_url

    @property
    def serving(self) -> str:
        return self.recommender.encoder.version

    def check(self) -> str | None:
        """Look for a new bundle and switch to it; the version switched to, if any."""
        try:
            found = BundleManifest.read(self.settings.models_path / INTEREST_BUNDLE, "interest-encoder", verify=False)
        except ModelError:
            return None  # mid-replacement, or removed: the served model stays
        if found.version in (self.serving, *self.refused):
            return None
        try:
            interest, items = self.load(self.settings)
            problem = self._misfit(interest, items)
            if problem:
                log.error("model %s cannot be swapped in: %s", interest.version, problem)
                self.refused.add(interest.version)
                return None
            self._switch(interest, items)
        except Exception as exc:  # the served model carries on whatever went wrong; the next look tries again
            if self.failed != found.version:
                log.warning(
                    "model %s is not swapped in yet (%s: %s); trying again", found.version, type(exc).__name__, exc
                )
                self.failed = found.version
            return None
        return interest.version

    def _misfit(self, interest: InterestEncoderRuntime, items: ItemEncoderRuntime) -> str | None:
        served = self.recommender.encoder
        if interest.dim != served.dim:
            return f"it makes {interest.dim}-d user vectors, the users collection holds {served.dim}-d ones"
        if items.reads_text and items.text_dim != self.text_embedder.dim:
            made = self.text_embedder.dim
            return f"its item tower reads {items.text_dim}-d text vectors, the text encoder makes {made}-d"
        return None

    def _switch(self, interest: InterestEncoderRuntime, items: ItemEncoderRuntime) -> None:
        old = self.catalog.current
        collection = items_collection_name(self.settings.items_collection, items)
        target, fill = old, None
        if collection != old.collection:
            fill = self._fill(items, collection)
            target = fill.target
        log.info("switching to model %s (items in %s)", interest.version, collection)
        assert target.cache is not None
        cache = target.cache
        self.event_worker.submit(self.recommender.use, interest, cache).result()
        if fill is not None:
            self.catalog_worker.submit(self.catalog.finish_migration, fill).result()
            if self._owns_store and old.collection not in self.catalog.collections_in_use():
                self.store.drop_collection(old.collection)
        self.metrics.model.clear()
        self.metrics.model.labels(interest.version, interest.provider).set(1)
        self.info.update(served_model_info(interest, items))
        log.info("now serving model %s", interest.version)

    def _fill(self, items: ItemEncoderRuntime, collection: str) -> Migration:
        """The new tower's collection, filled from the catalogue while the served one keeps serving."""
        target = ItemTarget(
            ItemEmbedder(self.text_embedder, items),
            collection,
            ItemVectorCache.sized_by(self.settings, self.store, collection),
        )
        return fill_tower(self.settings, self.store, self.catalog, self.catalog_worker, target, self._owns_store)


def fill_tower(
    settings: Settings,
    store: VectorStore,
    catalog: CatalogBatchProcessor,
    catalog_worker: ThreadPoolExecutor,
    target: ItemTarget,
    owns_store: bool,
) -> Migration:
    """``target``'s collection filled from the catalogue topic while the catalogue agent keeps writing every
    change to it (``CatalogBatchProcessor.begin_migration``); the fill is left registered for the caller to
    finish, keep or abandon. ``owns_store``: an embedded store, whose collections no other worker reads."""
    collection = target.collection
    if owns_store and collection not in catalog.collections_in_use():
        store.drop_collection(collection)  # what a failed earlier fill left is no base to build on
    store.ensure_collection(collection, target.embedder.item_encoder.dim)
    fill = catalog_worker.submit(catalog.begin_migration, target, lambda: catalogue_ends(settings)).result()
    try:
        filled = 0
        for changes in read_catalog(settings, fill.ends):
            newest = latest(changes)
            upserts = [c.item for c in newest.values() if c.item is not None]
            points = {p.id: p for p in target.embedder.points(upserts)}  # the items the tower can place
            chunk = {i: points.get(i) for i, c in newest.items() if c.item is None or i in points}
            catalog_worker.submit(catalog.backfill, fill, chunk).result()
            filled += len(points)
            log.info("%d items embedded into %s", filled, collection)
        catalog_worker.submit(store.build_index, collection).result()
    except BaseException:
        catalog_worker.submit(catalog.abandon_migration, fill).result()
        if owns_store and collection not in catalog.collections_in_use():
            store.drop_collection(collection)
        raise
    return fill
