"""The experiment file, read at start and whenever it changes: variants prepared, then swapped in between
two micro-batches.

A variant with a model of its own gets that bundle loaded beside the served one; when its item tower
differs, the tower gets its own collection, filled from the catalogue before any event is read and kept
in step by the catalogue agent from then on. Such models load at start: a changed file that names a
model not loaded yet is refused (restart the workers to load it), while shares, re-ranking settings,
baselines, the attribution window and new experiments over loaded models change live.
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
    ) -> None:
        self.settings = settings
        self.path = Path(settings.experiments)
        self.store = store
        self.text_embedder = text_embedder
        self.events = events
        self.catalog = catalog
        self.load = load
        self.models: dict[Path, Recommender] = {}  # variant models loaded so far, by bundle folder
        self.read_digest = b""  # of the file's contents last read, good or bad: each change is said once

    def start(self) -> RunningExperiment:
        """The experiment at start-up, its models loaded and their collections filled; a bad file stops the worker."""
        config = load_experiment(self.path, self.settings)
        self.read_digest = self._digest()
        running = self.prepare(config, loading=True)
        self.events.experiment = running
        log.info("experiment %r running: %s", config.name, _shares(config))
        return running

    def check(self, event_worker: ThreadPoolExecutor) -> RunningExperiment | None:
        """Re-read a changed file and swap its experiment in on the events thread; the one swapped in, if any."""
        digest = self._digest()
        if digest == self.read_digest:
            return None
        self.read_digest = digest
        try:
            config = load_experiment(self.path, self.settings)
            running = self.prepare(config, loading=False)
        except (ConfigError, ModelError) as exc:
            log.error("experiment file changed but is not used (the running experiment carries on): %s", exc)
            return None
        event_worker.submit(setattr, self.events, "experiment", running).result()
        log.info("experiment %r now running: %s", config.name, _shares(config))
        return running

    def prepare(self, config: ExperimentConfig, *, loading: bool) -> RunningExperiment:
        variants = {v.name: self._lists(config, v, loading) for v in config.variants}
        return RunningExperiment(config, variants, self.events.metrics, self.settings.top_k)

    def _lists(self, config: ExperimentConfig, variant: VariantConfig, loading: bool) -> VariantLists:
        served = self.events.recommender
        if variant.baseline is not None:
            return PopularLists(self.events.trending, served)
        policy = variant.policy(self.settings)
        if variant.model_dir is None:
            return ModelLists(served, policy)
        if variant.model_dir not in self.models:
            if not loading:
                raise ConfigError(
                    f"variant {variant.name!r} names model {variant.model_dir}, not loaded by this worker: "
                    "restart the workers to load it"
                )
            self.models[variant.model_dir] = self._load_model(config, variant)
        return ModelLists(self.models[variant.model_dir], policy, own_model=True)

    def _load_model(self, config: ExperimentConfig, variant: VariantConfig) -> Recommender:
        """A variant's model beside the served one: its tower's collection filled, its users' vectors apart."""
        assert variant.model_dir is not None
        interest, items = self.load(self.settings.with_overrides(model_dir=str(variant.model_dir)))
        if items.reads_text and items.text_dim != self.text_embedder.dim:
            raise ModelError(
                f"variant {variant.name!r}: its item tower reads {items.text_dim}-d text vectors, "
                f"the text encoder makes {self.text_embedder.dim}-d"
            )
        served = self.events.recommender
        cache = served.items  # the served tower's vectors, when the variant's model shares that tower
        if items.tower_id != self.catalog.current.embedder.item_encoder.tower_id:
            collection = items_collection_name(self.settings.items_collection, items)
            self.store.ensure_collection(collection, items.dim)
            embedder = ItemEmbedder(self.text_embedder, items)
            fill_missing(self.settings, self.store, collection, embedder)
            cache = ItemVectorCache.sized_by(self.settings, self.store, collection)
            self.catalog.variant_targets.append(ItemTarget(embedder, collection, cache))
        users = f"{self.settings.users_collection}-{config.name}-{variant.name}"
        self.store.ensure_collection(users, interest.dim)
        log.info("experiment %r: variant %r serves model %s", config.name, variant.name, interest.version)
        return Recommender(
            interest,
            self.store,
            cache,
            users_collection=users,
            top_k=served.top_k,
            clock=served.clock,
            metrics=served.metrics,
            rules=served.rules,
            pseudonyms=served.pseudonyms,
        )

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
