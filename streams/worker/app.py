"""The only wiring point: settings + injected parts → a Faust app.

``build_app`` takes the encoders and the vector store as arguments;
``load_components`` builds the production ones from settings. Nothing here
is a module-level global, so a test can wire the app with its own parts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from mode.types.signals import BaseSignalT

from encoder.config import INTEREST_BUNDLE, TEXT_BUNDLE
from encoder.runtime import OnnxInterestEncoder, OnnxItemEncoder, OnnxTextEmbedder
from streams.console.routes import register_console
from streams.cooccurrence import CooccurrenceSpec, PartitionedCooccurrence
from streams.errors import ModelError
from streams.item_vectors import ItemEmbedder, ItemVectorCache
from streams.metrics import WorkerMetrics
from streams.pipeline import CatalogBatchProcessor, EventBatchProcessor, WindowLimits
from streams.ports import InterestEncoderRuntime, ItemEncoderRuntime, TextEmbedder, VectorStore
from streams.pseudonym import Pseudonyms
from streams.recommend import Recommender, now_ms
from streams.settings import Settings
from streams.stores.edge import EdgeVectorStore
from streams.stores.retry import RetryingVectorStore
from streams.stores.server import QdrantVectorStore, Replication
from streams.trending import PartitionedTrending
from streams.worker.agents import Agents, register_agents
from streams.worker.catalog_sync import fill_missing, items_collection_name
from streams.worker.experiment_loader import ExperimentLoader
from streams.worker.faust_compat import RecoveringTableManager
from streams.worker.http_api import register_http_api
from streams.worker.model_swap import ModelSwapper, served_model_info

PRODUCER_BATCH_BYTES = 512 * 1024


@dataclass
class Components:
    """The parts a worker is wired with (injected: a test or another deployment brings its own)."""

    text_embedder: TextEmbedder
    interest_encoder: InterestEncoderRuntime
    item_encoder: ItemEncoderRuntime
    store: VectorStore
    clock: Callable[[], int] = now_ms
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)


def load_model(settings: Settings) -> tuple[OnnxInterestEncoder, OnnxItemEncoder]:
    """The interest encoder bundle in the model folder: its user tower and its item tower."""
    bundle = settings.models_path / INTEREST_BUNDLE
    threads = settings.encoder_threads
    interest = OnnxInterestEncoder(
        bundle, settings.encoder_provider, intra_op_threads=threads, precision=settings.encoder_precision
    )
    return interest, OnnxItemEncoder(bundle, settings.encoder_provider, intra_op_threads=threads)


def load_components(settings: Settings) -> Components:
    interest, items = load_model(settings)
    text = OnnxTextEmbedder(settings.models_path / TEXT_BUNDLE, settings.encoder_provider)
    if items.reads_text and items.text_dim != text.dim:
        raise ModelError(
            f"the interest encoder reads {items.text_dim}-dim text vectors; the text encoder gives {text.dim}"
        )
    return Components(text, interest, items, open_vector_store(settings))


def open_vector_store(settings: Settings) -> VectorStore:
    """The Qdrant server at ``qdrant_url``, else embedded Qdrant (Qdrant Edge) in ``qdrant_path``."""
    if settings.qdrant_url:
        key = settings.qdrant_api_key.reveal() if settings.qdrant_api_key else None
        verify = ssl.create_default_context(cafile=settings.qdrant_ca_cert) if settings.qdrant_ca_cert else True
        replication = Replication(
            settings.qdrant_shards, settings.qdrant_replication_factor, settings.qdrant_write_consistency_factor
        )
        ca_pem = Path(settings.qdrant_ca_cert).read_bytes() if settings.qdrant_ca_cert else None
        return QdrantVectorStore.connect(
            settings.qdrant_url,
            key,
            search_ef=settings.search_ef,
            verify=verify,
            replication=replication,
            grpc_port=settings.qdrant_grpc_port,
            ca_pem=ca_pem,
        )
    return EdgeVectorStore(
        settings.qdrant_local_path, search_ef=settings.search_ef, native_from=settings.native_search_from
    )


def model_info(settings: Settings, components: Components) -> dict[str, Any]:
    """What `GET /model` answers: the loaded encoders and the settings that shape a list."""
    text = components.text_embedder
    return {
        **served_model_info(components.interest_encoder, components.item_encoder),
        "text_encoder": {"version": text.version, "provider": text.provider, "dim": text.dim},
        "top_k": settings.top_k,
        "max_k": settings.max_http_k,
        "window_size": settings.window_size,
    }


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The worker's Kafka security, from the same settings as every other client's."""
    protocol = settings.kafka_security_protocol
    context = settings.kafka_ssl_context()
    if protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None  # validated
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.reveal(),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context is not None else None


@dataclass(frozen=True)
class Processors:
    """The batch logic of both agents, over the worker's store and caches."""

    recommender: Recommender
    events: EventBatchProcessor
    catalog: CatalogBatchProcessor
    pseudonyms: Pseudonyms


def build_processors(settings: Settings, components: Components, store: VectorStore) -> Processors:
    items_collection = items_collection_name(settings.items_collection, components.item_encoder)
    store.ensure_collection(items_collection, components.item_encoder.dim)
    store.ensure_collection(settings.users_collection, components.interest_encoder.dim)
    # Before any event is read: a model with a new item tower starts from an empty collection.
    fill_missing(settings, store, items_collection, ItemEmbedder(components.text_embedder, components.item_encoder))
    limits = settings.limits()
    pseudonyms = Pseudonyms(settings.pseudonymize_key)
    item_cache = ItemVectorCache.sized_by(settings, store, items_collection)
    cooccurrence = counted_cooccurrence(settings, components.interest_encoder)
    recommender = Recommender(
        components.interest_encoder,
        store,
        item_cache,
        users_collection=settings.users_collection,
        top_k=settings.top_k,
        clock=components.clock,
        metrics=components.metrics,
        policy=settings.rerank_policy(),
        rules=settings.business_rules(),
        pseudonyms=pseudonyms,
        cooccurrence=cooccurrence,
    )
    events = EventBatchProcessor(
        recommender,
        WindowLimits.of(settings),
        limits,
        components.clock,
        control_topic=settings.control_topic,
        trending=PartitionedTrending(settings.trending_half_life_s),
        restored_capacity=settings.window_cache_size,
        cooccurrence=cooccurrence,
    )
    catalog = CatalogBatchProcessor(
        components.text_embedder,
        components.item_encoder,
        store,
        items_collection=items_collection,
        limits=limits,
        item_cache=item_cache,
        clock=components.clock,
        metrics=components.metrics,
    )
    return Processors(recommender, events, catalog, pseudonyms)


def counted_cooccurrence(settings: Settings, encoder: InterestEncoderRuntime) -> PartitionedCooccurrence | None:
    """Co-occurrence counted as the served model's fusion was fitted (a model swapped in later is fused with
    these counts), or None: off, or auto with a model that does not fuse it (counting costs every event)."""
    fusion = encoder.fusion
    if settings.cooccurrence == "off" or (settings.cooccurrence == "auto" and not fusion.active):
        return None
    return PartitionedCooccurrence(fusion.cooccurrence if fusion.active else CooccurrenceSpec())


def faust_app(settings: Settings) -> faust.App:
    settings.faust_data_path.parent.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=broker_credentials(settings),
        store=settings.table_store,
        datadir=str(settings.faust_data_path),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=settings.kafka_session_timeout_s / 4,
        web_enabled=bool(settings.http_port),
        web_port=settings.http_port or None,
        # Listen where the other workers reach this one (they forward requests here); loopback by default.
        web_bind=settings.http_host or "0.0.0.0",
        web_host=settings.http_host or socket.gethostname(),
        producer_acks=-1,  # all in-sync replicas (Faust's default, stated): see RTREC_TOPIC_MIN_INSYNC_REPLICAS
        producer_max_request_size=max(settings.max_message_bytes * 2, 1_048_576),
        # A micro-batch's lists fill 16 KB (the default) many times over, and a full batch makes every
        # later send wait for the broker. With the lists sent straight to this producer, 512 KB batches
        # took the bench's produce stage from 127 to 20 µs per event (BENCHMARKS.md). A batch is one
        # record batch on the broker, so it stays under the broker's default message.max.bytes (1 MiB).
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
        TableManager=RecoveringTableManager,  # a rebalance during recovery crashed Faust's own
    )


def _run_experiments(
    app: faust.App,
    settings: Settings,
    components: Components,
    store: VectorStore,
    processors: Processors,
    agents: Agents,
) -> None:
    """The experiment of ``RTREC_EXPERIMENTS``, running before any event is read, and the file watched."""
    loader = ExperimentLoader(
        settings,
        store,
        components.text_embedder,
        processors.events,
        processors.catalog,
        load_model,
        event_worker=agents.event_worker,
        catalog_worker=agents.catalog_worker,
    )
    loader.start()
    if settings.model_reload_s > 0:
        watcher = ThreadPoolExecutor(1, thread_name_prefix="rtrec-experiment")

        @app.timer(settings.model_reload_s, name="rtrec.watch_experiment")
        async def watch_experiment_file() -> None:
            await asyncio.get_running_loop().run_in_executor(watcher, loader.check)


def build_app(settings: Settings, components: Components) -> faust.App:
    # Outages of the store pause the stream rather than fail it (streams.stores.retry).
    store = RetryingVectorStore(components.store, components.metrics)
    processors = build_processors(settings, components, store)
    app = faust_app(settings)
    agents = register_agents(app, settings, processors.events, processors.catalog, processors.pseudonyms)
    info = model_info(settings, components)
    if settings.experiments:
        _run_experiments(app, settings, components, store, processors, agents)
    if settings.http_port:
        register_http_api(app, settings, agents, processors.events, info)
    if settings.console:
        register_console(app, settings, agents, processors.events, info)
    if settings.model_reload_s > 0:
        swapper = ModelSwapper(
            settings,
            store,
            components.text_embedder,
            processors.recommender,
            processors.catalog,
            event_worker=agents.event_worker,
            catalog_worker=agents.catalog_worker,
            load=load_model,
            metrics=components.metrics,
            info=info,
        )
        swap_worker = ThreadPoolExecutor(1, thread_name_prefix="rtrec-model-swap")

        @app.timer(settings.model_reload_s)
        async def watch_model_folder() -> None:
            await asyncio.get_running_loop().run_in_executor(swap_worker, swapper.check)

    def stop_retrying(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        store.stop_retrying()

    app.on_before_shutdown.connect(stop_retrying)

    components.metrics.model.labels(components.interest_encoder.version, components.interest_encoder.provider).set(1)
    if settings.metrics_port:
        components.metrics.serve(settings.metrics_port)
    return app
