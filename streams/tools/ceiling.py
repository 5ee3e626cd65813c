"""The framework's ceiling: a Faust worker doing exactly the event path's I/O and nothing else.

The bench runs it next to the pipeline, on the same broker, topics, partitions and batch limits, so
that `pipeline / ceiling` says how much of what Faust allows on this machine the pipeline reaches.
Per micro-batch, as the pipeline: every message decoded (the record contract), one write through
Faust's table per touched user of a full window's size, and one list per refresh sent through the
producer Faust flushes before it commits, of a real list's size. No model, no store, no window logic.

Run as a child process (``python -m streams.tools.ceiling``, settings from the environment) under an
app id of its own, whose group starts where the events topic ends (``start_at_end``).
"""

from __future__ import annotations

import logging

import faust
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from streams.clients.kafka_io import group_reader, topic_partitions
from streams.errors import InvalidRecord
from streams.metrics import WorkerMetrics
from streams.pipeline import WindowLimits
from streams.records import Event, Recommendation, RecommendedItem, decode_event, encode_recommendation
from streams.settings import Settings
from streams.worker.agents import raw_topic
from streams.worker.app import faust_app
from streams.worker.faust_compat import faust_take_events
from streams.worker.output import Output
from streams.worker.tables import WINDOWS_TABLE, add_table

CEILING_COMMAND = ("-m", "streams.tools.ceiling")
TITLE = "Northwind lightweight hard-sided cooler"  # a generated title of typical length: a reason's size


def full_window_bytes(settings: Settings) -> int:
    """The stored size of a long-running user's window: full, with as many evicted entries kept."""
    window = WindowLimits.of(settings).new_window()
    for n in range(2 * settings.window_size):
        window.add(Event(f"ceiling:{n:012d}", "u", f"item-{n:06d}", "view", 1_700_000_000_000 + n))
    return len(window.to_bytes())


def list_for(event: Event, event_ids: tuple[str, ...], top_k: int) -> bytes:
    """A list of the pipeline's shape and size answering ``event``."""
    items = tuple(
        RecommendedItem(f"item-{n:06d}", 1.0 - n / 100, f"because you viewed {TITLE}", (event.item_id,))
        for n in range(top_k)
    )
    return encode_recommendation(
        Recommendation(event.user_id, items, "ceiling", event.event_id, event.ts, event.ts, event_ids)
    )


def build_ceiling_app(settings: Settings) -> faust.App:
    app = faust_app(settings)
    windows = add_table(app, settings, WINDOWS_TABLE)
    metrics = WorkerMetrics()  # batch sizes only: the bench reads them as it reads the pipeline's
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    output = Output(app, settings, metrics)
    limits = settings.limits()
    size = full_window_bytes(settings)

    async def events(stream: faust.StreamT) -> None:
        async for batch in faust_take_events(stream, settings.batch_max, settings.batch_within_s):
            metrics.batch_events.observe(len(batch))
            touched: dict[str, tuple[Event, int, list[str]]] = {}
            for e in batch:
                try:
                    event = decode_event(e.message.value, e.message.key, limits)
                except InvalidRecord:
                    continue  # the bench sends none
                seen = touched.get(event.user_id)
                touched[event.user_id] = (event, e.message.partition, [*(seen[2] if seen else []), event.event_id])
            for user_id, (event, partition, _) in touched.items():
                key = user_id.encode("utf-8")
                stored = windows.get(key) or bytes(size)
                windows.put(key, (event.event_id.encode() + stored)[:size], partition)
            for user_id, (event, _, event_ids) in touched.items():
                value = list_for(event, tuple(event_ids), settings.top_k)
                await output.send(settings.recommendations_topic, user_id.encode("utf-8"), value)

    app.agent(raw_topic(app, settings.events_topic, settings.control_topic), name="rtrec.events")(events)
    return app


def start_at_end(settings: Settings, topics: list[str]) -> None:
    """Commit the end of ``topics`` for the ceiling's group: it reads only what is sent from now on."""
    with group_reader(settings, settings.app_id) as consumer:
        partitions = [TopicPartition(t, p) for t in topics for p in topic_partitions(consumer, t)]
        ends = consumer.end_offsets(partitions)
        consumer.commit({tp: OffsetAndMetadata(end, "", -1) for tp, end in ends.items()})


def main() -> None:
    settings = Settings.from_env().validated()
    logging.basicConfig(level=settings.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    faust.Worker(build_ceiling_app(settings), loglevel=settings.log_level, quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
