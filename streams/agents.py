"""Faust agents: thin. They batch at the stream boundary, run the pure batch logic
off the event loop, store windows and send outputs.

Offsets are acknowledged only after a micro-batch's windows are written and its
outputs handed to the producer; Faust flushes the producer before it commits,
so delivery is at-least-once and a crash replays, never loses, a batch. A record
the broker refuses after the producer's retries is logged and counted
(``rtrec_undelivered_total``): Faust's commit does not wait on it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import faust
from aiokafka.errors import KafkaError
from faust import streams as faust_streams
from faust.types import TP

from streams.errors import BrokerError
from streams.kafka_io import TopicRecord, read_uncommitted
from streams.offset_holes import OffsetHoles, UndeliveredWatch
from streams.process import CatalogBatchProcessor, EventBatchProcessor, IncomingMessage
from streams.pseudonym import Pseudonyms
from streams.records import encode_deadletter, encode_recommendation
from streams.settings import Settings

log = logging.getLogger(__name__)


def _raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    """Bytes in, bytes out: validation is ours (streams.records), not a Faust codec's."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def _incoming(events: Sequence[Any]) -> list[IncomingMessage]:
    return [
        IncomingMessage(e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset)
        for e in events
    ]


def _batches(stream: faust.StreamT, settings: Settings) -> AsyncIterator[Sequence[Any]]:
    # take_events (acks after the batch is processed) exists on faust.Stream, not on its StreamT protocol.
    return cast(faust.Stream, stream).take_events(settings.batch_max, within=settings.batch_within_s)


LAG_INTERVAL_S = 5.0  # how often the consumer-lag gauge is refreshed from the broker
# What a timer's consumer calls raise when a rebalance or a broker outage cuts in. An exception out of a
# Faust timer crashes the worker, so the timers catch these and try again at their next tick.
HOUSEKEEPING_ERRORS = (KafkaError, asyncio.TimeoutError)


@dataclass
class _Activity:
    """The events agent's progress, as the timer that watches for undelivered messages needs it."""

    running: bool = False  # a micro-batch is being processed
    batches: int = 0  # micro-batches processed so far


@dataclass(frozen=True)
class Agents:
    windows: WindowTable  # user's state key (bytes) → stored window
    state_key: Callable[[str], str]  # user id → the key their state is kept under
    event_worker: ThreadPoolExecutor  # the thread every model and store call of the events agent runs on
    catalog_worker: ThreadPoolExecutor  # the same for the catalogue agent


class WindowTable(faust.Table):
    """The windows, each written to the changelog partition of its user's events.

    A micro-batch spans several partitions and its writes happen after the batch, outside
    any one event's context, so each write names its partition (the one its user's events
    came from) instead of Faust taking the current event's. That keeps changelog partition
    p holding exactly the windows of events partition p, which is what recovery after a
    rebalance assumes, also when the keys are pseudonyms that hash elsewhere. The RocksDB
    store files a key under "the current event's" partition, so a write also presents one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writing: dict[bytes, int] = {}

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        with self._writing_to(key, partition):
            self[key] = value

    def partition_for_key(self, key: Any) -> int | None:
        return self._writing.get(key)

    @contextmanager
    def _writing_to(self, key: bytes, partition: int) -> Iterator[None]:
        self._writing[key] = partition
        stand_in = _EventOnPartition(partition)  # held here: the context keeps only a weak reference
        token = faust_streams._current_event.set(weakref.ref(cast(Any, stand_in)))  # Faust exposes no setter
        try:
            yield
        finally:
            faust_streams._current_event.reset(token)
            del self._writing[key]


class _EventOnPartition:
    """All a table store reads of the current event: its message's partition."""

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


WINDOWS_TABLE = "user-windows"


def windows_changelog_topic(settings: Settings) -> str:
    """The topic Faust backs the windows table with (a restarted worker recovers its windows from it)."""
    return f"{settings.app_id}-{WINDOWS_TABLE}-changelog"


def _rocksdb_options(memory_mb: int) -> dict[str, int]:
    """Faust's RocksDB options that keep one partition's database within ``memory_mb``."""
    budget = memory_mb * 2**20
    return {"block_cache_size": budget * 3 // 4, "write_buffer_size": budget // 8, "max_write_buffer_number": 2}


def _key(state_key: Callable[[str], str], user_id: str) -> bytes:
    return state_key(user_id).encode("utf-8")


def register_agents(
    app: faust.App,
    settings: Settings,
    events: EventBatchProcessor,
    catalog: CatalogBatchProcessor,
    pseudonyms: Pseudonyms,
) -> Agents:
    # Control commands are keyed and partitioned like the events, and read by the same agent, so a
    # forget-user touches the window no other code is writing (the two topics are not ordered against
    # each other: see UserWindow.forget).
    events_topic = _raw_topic(app, settings.events_topic, settings.control_topic)
    items_topic = _raw_topic(app, settings.items_topic)
    # One window per user, on the changelog partition of the user's events (WindowTable).
    windows = WindowTable(
        app,
        name=WINDOWS_TABLE,
        default=None,
        beacon=app.tables.beacon,
        partitions=settings.topic_partitions,
        key_type=bytes,  # bytes means the raw codec for the changelog
        value_type=bytes,
        use_partitioner=True,  # reads need no event context; writes name their partition (WindowTable)
        options=_rocksdb_options(settings.table_cache_mb) if settings.table_store.startswith("rocksdb") else None,
    )
    app.tables.add(windows)
    state_key = pseudonyms.of
    # One thread per agent: model and store calls run off the loop, and in order.
    stage = events.metrics.stage
    event_worker = ThreadPoolExecutor(1, thread_name_prefix="rtrec-events")
    catalog_worker = ThreadPoolExecutor(1, thread_name_prefix="rtrec-catalog")

    def report_undelivered(topic: str, delivery: asyncio.Future[Any]) -> None:
        # Faust's flush before a commit waits for deliveries but does not check them: a record the
        # producer gave up on is lost, so it must at least be seen.
        if not delivery.cancelled() and (error := delivery.exception()) is not None:
            log.error("a record for %s was not delivered and is lost: %r", topic, error)
            events.metrics.undelivered.labels(topic).inc()

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        # Straight to Faust's producer: Topic.send's per-message machinery cost 3x as much (measured), and
        # the producer is what Faust flushes before it commits, so delivery stays at-least-once.
        delivery = await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)
        cast(asyncio.Future, delivery).add_done_callback(functools.partial(report_undelivered, topic))

    async def dead_letter(letters: Sequence[Any]) -> None:
        for letter in letters:
            await send(settings.deadletter_topic, letter.key, encode_deadletter(letter))

    async def process_event_batch(messages: Sequence[IncomingMessage]) -> None:
        loop = asyncio.get_running_loop()
        partition_of = {m.key: m.partition for m in messages if m.key is not None}
        with stage("state"):
            stored = {user: windows.get(_key(state_key, user)) for user in events.users_in(messages)}
        outcome = await loop.run_in_executor(event_worker, events.process, messages, stored)
        with stage("state"):
            for user_id, stored_window in outcome.windows.items():
                partition = partition_of[user_id.encode("utf-8")]
                windows.put(_key(state_key, user_id), stored_window, partition)
        with stage("produce"):
            for rec in outcome.recommendations:
                await send(settings.recommendations_topic, rec.user_id.encode("utf-8"), encode_recommendation(rec))
            await dead_letter(outcome.dead_letters)
        log.debug("events batch: %s", outcome.counts)

    holes: OffsetHoles[TP] = OffsetHoles()

    async def recover_skipped(messages: Sequence[IncomingMessage]) -> None:
        """Process the messages the stream jumped over before this batch (see ``streams.offset_holes``)."""
        delivered = [(TP(m.topic, m.partition), m.offset) for m in messages]
        skipped = holes.skipped(app.consumer_generation_id, delivered, lambda tp: _committed(app, tp))
        for tp, start, stop in skipped:
            records = await _read_back(settings, tp, start, stop)
            lost = [IncomingMessage(r.key, r.value, tp.topic, r.partition, r.offset) for r in records]
            log.warning(
                "%s partition %d: the stream skipped offsets %d to %d (faust-streaming #596); "
                "%d messages no worker had committed read back from the broker and processed",
                tp.topic, tp.partition, start, stop - 1, len(lost),
            )  # fmt: skip
            events.metrics.skipped_messages.labels(tp.topic).inc(len(lost))
            if lost:
                await process_event_batch(lost)
            # Done: Faust's commits may move past them (it exposes no public way to say so).
            await cast(Any, app.consumer)._add_gap(tp, start, stop - 1)

    activity = _Activity()

    @app.agent(events_topic, name="rtrec.events")
    async def process_events(stream: faust.StreamT) -> None:
        async for batch in _batches(stream, settings):
            activity.running = True
            try:
                messages = _incoming(batch)
                await recover_skipped(messages)
                await process_event_batch(messages)
            finally:
                activity.running = False
                activity.batches += 1

    undelivered: UndeliveredWatch[TP] = UndeliveredWatch()
    event_inputs = {settings.events_topic, settings.control_topic}

    async def stalled_partitions() -> list[tuple[TP, int, int]] | None:
        """``UndeliveredWatch.stalled`` for the event partitions now; None when this look proves nothing
        (a batch ran or a rebalance came, before or while the consumer was asked)."""
        look = (app.rebalancing_count, activity.batches)
        if activity.running or app.rebalancing:
            return None
        generation = app.consumer_generation_id
        offsets = {}
        for tp in sorted(tp for tp in app.consumer.assignment() if tp.topic in event_inputs):
            position = await app.consumer.position(tp)
            if position is not None:
                offsets[tp] = (holes.expected(generation, tp, _committed(app, tp)), position)
        if activity.running or look != (app.rebalancing_count, activity.batches):
            return None
        return undelivered.stalled(look, offsets)

    @app.timer(LAG_INTERVAL_S)
    async def redeliver_stalled() -> None:
        """Seek back the partitions whose fetched messages never reached the stream (``streams.offset_holes``)."""
        try:
            stalled = await stalled_partitions()
            if stalled is None:
                undelivered.busy()
            for tp, expected, position in stalled or ():
                log.warning(
                    "%s partition %d: the consumer fetched up to offset %d, the stream delivered nothing from "
                    "%d on (faust-streaming #596); seeking back to %d to have them delivered",
                    tp.topic, tp.partition, position - 1, expected, expected,
                )  # fmt: skip
                events.metrics.skipped_messages.labels(tp.topic).inc(position - expected)
                await app.consumer.seek_wait({tp: expected})
        except HOUSEKEEPING_ERRORS as exc:
            # A rebalance can take a partition away mid-look (IllegalStateError): the next look starts afresh.
            log.info("the look for undelivered messages was cut short (%r); looking again afresh", exc)
            undelivered.busy()

    @app.agent(items_topic, name="rtrec.catalog")
    async def process_catalog(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for batch in _batches(stream, settings):
            outcome = await loop.run_in_executor(catalog_worker, catalog.process, _incoming(batch))
            await dead_letter(outcome.dead_letters)
            log.info(
                "catalog: %d upserted, %d deleted, %d dead-lettered",
                len(outcome.upserted),
                len(outcome.deleted),
                len(outcome.dead_letters),
            )

    inputs = {settings.events_topic, settings.control_topic, settings.items_topic}

    @app.timer(LAG_INTERVAL_S)
    async def track_lag() -> None:
        # From the broker's end offsets, not from fetched records: a stalled worker fetches none.
        assigned = sorted(tp for tp in app.consumer.assignment() if tp.topic in inputs)
        uncommitted = [tp for tp in assigned if _committed(app, tp) is None]
        try:
            ends = await app.consumer.highwaters(*assigned) if assigned else {}
            starts = await app.consumer.earliest_offsets(*uncommitted) if uncommitted else {}
        except HOUSEKEEPING_ERRORS as exc:  # a broker away or a rebalance: a gauge is no reason to crash
            log.warning("consumer lag not refreshed (%r); trying again in %.0f s", exc, LAG_INTERVAL_S)
            return
        lag = events.metrics.consumer_lag
        lag.clear()  # partitions revoked since the last tick leave the gauge
        for tp in assigned:
            position = _committed(app, tp)
            done = starts.get(tp, 0) if position is None else position
            lag.labels(tp.topic, str(tp.partition)).set(max(ends.get(tp, done) - done, 0))

    return Agents(windows, state_key, event_worker, catalog_worker)


async def _read_back(settings: Settings, tp: TP, start: int, stop: int) -> list[TopicRecord]:
    """The records at offsets ``start`` to ``stop - 1`` that no worker of the group has committed past,
    read until the broker answers (the batch waits)."""
    backoff = 0.5
    while True:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, read_uncommitted, settings, settings.app_id, tp.topic, tp.partition, start, stop
            )
        except BrokerError as exc:
            log.warning("reading skipped messages back failed (%s); retrying in %.1f s", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


def _committed(app: faust.App, tp: Any) -> int | None:
    """The committed offset (the next to read) Faust holds for ``tp``; None before the first commit."""
    return cast(Any, app.consumer)._committed_offset.get(tp)  # Faust exposes no public accessor
