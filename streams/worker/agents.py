"""The worker's agents and timers, registered on a Faust app. Each piece lives in its own module:
the events agent (``events_agent``), the tables (``tables``), what is sent (``output``), the
housekeeping timers (``timers``) and the counts kept per partition (``partition_keeper``); the catalogue
agent is small enough to stand here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faust

from streams.pipeline import CatalogBatchProcessor, EventBatchProcessor
from streams.pseudonym import Pseudonyms
from streams.settings import Settings
from streams.worker.events_agent import EventsAgent, incoming
from streams.worker.faust_compat import take_batches
from streams.worker.output import Output
from streams.worker.partition_keeper import (
    COOCCURRENCE_WRITE_S,
    TRENDING_SNAPSHOT_S,
    CooccurrenceRows,
    PartitionKeeper,
    TrendingSnapshots,
)
from streams.worker.tables import (
    COOCCURRENCE_TABLE,
    EXPERIMENT_COUNTS_TABLE,
    TRENDING_TABLE,
    WINDOWS_TABLE,
    PartitionedTable,
    add_table,
)
from streams.worker.timers import LAG_INTERVAL_S, LagGauge, UndeliveredLook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Agents:
    """What the rest of the worker (HTTP API, model swap) reaches of the agents."""

    windows: PartitionedTable  # user's state key (bytes) → stored window
    state_key: Callable[[str], str]  # user id → the key their state is kept under
    event_worker: ThreadPoolExecutor  # the thread every model and store call of the events agent runs on
    catalog_worker: ThreadPoolExecutor  # the same for the catalogue agent
    output: Output  # what the worker sends (lists, dead letters, control commands)


def raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    """Bytes in, bytes out: validation is ours (streams.records), not a Faust codec's."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def register_agents(
    app: faust.App,
    settings: Settings,
    events: EventBatchProcessor,
    catalog: CatalogBatchProcessor,
    pseudonyms: Pseudonyms,
) -> Agents:
    windows = add_table(app, settings, WINDOWS_TABLE)
    counts = add_table(app, settings, EXPERIMENT_COUNTS_TABLE) if settings.experiments else None
    output = Output(app, settings, events.metrics)
    events_agent = EventsAgent(app, settings, events, windows, pseudonyms.of, output, counts)
    app.agent(raw_topic(app, settings.events_topic, settings.control_topic), name="rtrec.events")(events_agent.run)
    catalog_worker = register_catalog_agent(app, settings, catalog, output)
    app.timer(LAG_INTERVAL_S, name="rtrec.redeliver_stalled")(UndeliveredLook(app, settings, events_agent).tick)
    app.timer(LAG_INTERVAL_S, name="rtrec.track_lag")(LagGauge(app, settings, events.metrics).tick)
    trending = PartitionKeeper(
        app, settings, TrendingSnapshots(events.trending), add_table(app, settings, TRENDING_TABLE)
    )
    app.timer(TRENDING_SNAPSHOT_S, name="rtrec.keep_trending")(trending.tick)
    if events.cooccurrence is not None:
        rows = CooccurrenceRows(events.cooccurrence)
        together = PartitionKeeper(app, settings, rows, add_table(app, settings, COOCCURRENCE_TABLE))
        app.timer(COOCCURRENCE_WRITE_S, name="rtrec.keep_cooccurrence")(together.tick)
    return Agents(windows, pseudonyms.of, events_agent.worker, catalog_worker, output)


def register_catalog_agent(
    app: faust.App, settings: Settings, catalog: CatalogBatchProcessor, output: Output
) -> ThreadPoolExecutor:
    """The catalogue agent: item changes embedded and upserted on a thread of its own."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="rtrec-catalog")

    async def process_catalog(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for batch in take_batches(stream, settings.batch_max, settings.batch_within_s):
            outcome = await loop.run_in_executor(worker, catalog.process, incoming(batch))
            await output.dead_letters(outcome.dead_letters)
            log.info(
                "catalog: %d upserted, %d deleted, %d dead-lettered",
                len(outcome.upserted),
                len(outcome.deleted),
                len(outcome.dead_letters),
            )

    app.agent(raw_topic(app, settings.items_topic), name="rtrec.catalog")(process_catalog)
    return worker
