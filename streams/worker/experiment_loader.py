"""The experiment file, read at start and whenever it changes: variants prepared, then swapped in between
two micro-batches.

A variant with a model of its own gets that bundle loaded beside the served one; when its item tower
differs, the tower gets its own collection, filled from the catalogue (at start before any event is
read; when the file changes, in the background like a model swap's, while the running experiment
carries on) and kept in step by the catalogue agent from then on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streams.errors import ConfigError, ModelError
from streams.experiments.config import ExperimentConfig, VariantConfig, load_experiment
from streams.experiments.serving import ModelLists, PopularLists, RunningExperiment, VariantLists
from streams.item_vectors import ItemEmbedder, ItemVectorCache
from streams.pipeline import CatalogBatchProcessor, EventBatchProcessor, ItemTarget
from streams.ports import InterestEncoderRuntime, ItemEncoderRuntime, TextEmbedder, VectorStore
from streams.recommend import Recommender
from streams.settings import Settings
from streams.worker.catalog_sync import fill_missing, items_collection_name
from streams.worker.model_swap import fill_tower

log = logging.getLogger(__name__)

Loader = Callable[[Settings], tuple[InterestEncoderRuntime, ItemEncoderRuntime]]


class ExperimentLoader:
    """Reads ``RTREC_EXPERIMENTS`` and keeps the events processor's running experiment in step with it."""

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        text_embedder: TextEmbedder,
        events: EventBatchProcessor,
        catalog: CatalogBatchProcessor,
        load: Loader,
        *,
        event_worker: ThreadPoolExecutor,
        catalog_worker: ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.path = Path(settings.experiments)
        self.store = store
        self.text_embedder = text_embedder
        self.events = events
        self.catalog = catalog
        self.load = load
        self.event_worker = event_worker  # where the running experiment is swapped, between two micro-batches
        self.catalog_worker = catalog_worker  # where the catalogue's targets change, between two of its batches
        self.models: dict[Path, tuple[Recommender, ItemTarget]] = {}  # variant models loaded, by bundle folder
        self.read_digest = b""  # of the file's contents last read, good or bad: each change is said once

    def start(self) -> RunningExperiment:
        """The experiment at start-up, its models loaded and their collections filled; a bad file stops the worker."""
        config = load_experiment(self.path, self.settings)
        self.read_digest = self._digest()
        running = self._swap_in(config, starting=True)
        log.info("experiment %r running: %s", config.name, _shares(config))
        return running

    def check(self) -> RunningExperiment | None:
        """Re-read a changed file and swap its experiment in; the one swapped in, if any. A new variant model
        is loaded and its collection filled first, while the running experiment carries on."""
        digest = self._digest()
        if digest == self.read_digest:
            return None
        self.read_digest = digest
        try:
            config = load_experiment(self.path, self.settings)
            running = self._swap_in(config, starting=False)
        except (ConfigError, ModelError) as exc:
            log.error("experiment file changed but is not used (the running experiment carries on): %s", exc)
            return None
        log.info("experiment %r now running: %s", config.name, _shares(config))
        return running

    def _swap_in(self, config: ExperimentConfig, *, starting: bool) -> RunningExperiment:
        variants = {v.name: self._lists(config, v, starting) for v in config.variants}
        running = RunningExperiment(config, variants, self.events.metrics, self.settings.top_k)
        self.event_worker.submit(setattr, self.events, "experiment", running).result()
        # Models no variant names any more are let go; the towers of those named stay in step.
        named = {v.model_dir for v in config.variants}
        self.models = {folder: loaded for folder, loaded in self.models.items() if folder in named}
        kept = [target for _, target in self.models.values()]
        self.catalog_worker.submit(self.catalog.set_variant_targets, kept).result()
        return running

    def _lists(self, config: ExperimentConfig, variant: VariantConfig, starting: bool) -> VariantLists:
        served = self.events.recommender
        if variant.baseline is not None:
            return PopularLists(self.events.trending, served)
        policy = variant.policy(self.settings)
        if variant.model_dir is None:
            return ModelLists(served, policy)
        if variant.model_dir not in self.models:
            self.models[variant.model_dir] = self._load_model(config, variant, starting)
        return ModelLists(self.models[variant.model_dir][0], policy, own_model=True)

    def _load_model(
        self, config: ExperimentConfig, variant: VariantConfig, starting: bool
    ) -> tuple[Recommender, ItemTarget]:
        """A variant's model beside the served one, and the tower it reads: the served tower when it has that
        one, else its own collection, filled (at start before any event is read, later while events flow)."""
        assert variant.model_dir is not None
        interest, items = self.load(self.settings.with_overrides(model_dir=str(variant.model_dir)))
        if items.reads_text and items.text_dim != self.text_embedder.dim:
            raise ModelError(
                f"variant {variant.name!r}: its item tower reads {items.text_dim}-d text vectors, "
                f"the text encoder makes {self.text_embedder.dim}-d"
            )
        target = self.catalog.current
        if items.tower_id != target.embedder.item_encoder.tower_id:
            target = self._own_tower(items, starting)
        assert target.cache is not None
        users = f"{self.settings.users_collection}-{config.name}-{variant.name}"
        self.store.ensure_collection(users, interest.dim)
        log.info("experiment %r: variant %r serves model %s", config.name, variant.name, interest.version)
        served = self.events.recommender
        recommender = Recommender(
            interest,
            self.store,
            target.cache,
            users_collection=users,
            top_k=served.top_k,
            clock=served.clock,
            metrics=served.metrics,
            rules=served.rules,
            pseudonyms=served.pseudonyms,
        )
        return recommender, target

    def _own_tower(self, items: ItemEncoderRuntime, starting: bool) -> ItemTarget:
        collection = items_collection_name(self.settings.items_collection, items)
        embedder = ItemEmbedder(self.text_embedder, items)
        target = ItemTarget(embedder, collection, ItemVectorCache.sized_by(self.settings, self.store, collection))
        if starting:  # the catalogue agent has not started: what the collection lacks, from the topic
            self.store.ensure_collection(collection, items.dim)
            fill_missing(self.settings, self.store, collection, embedder)
            return target
        owns_store = not self.settings.qdrant_url
        fill = fill_tower(self.settings, self.store, self.catalog, self.catalog_worker, target, owns_store)
        self.catalog_worker.submit(self.catalog.keep_for_variant, fill).result()
        return target

    def _digest(self) -> bytes:
        try:
            return hashlib.blake2b(self.path.read_bytes(), digest_size=16).digest()
        except OSError:
            return b""  # mid-replacement: the next look reads it


def _shares(config: ExperimentConfig) -> str:
    if config.interleave:
        return f"{config.variants[0].name} and {config.variants[1].name} interleaved"
    total = sum(v.share for v in config.variants)
    return ", ".join(f"{v.name} {100 * v.share / total:.0f}%" for v in config.variants)
