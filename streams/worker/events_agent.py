"""The events agent: micro-batches of events and control commands → windows stored, lists sent.

Offsets are acknowledged only after a micro-batch's windows are written and its outputs handed
to the producer; Faust flushes the producer before it commits, so delivery is at-least-once and a
crash replays, never loses, a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TP

from streams.clients.kafka_io import TopicRecord, read_uncommitted
from streams.errors import BrokerError
from streams.pipeline import EventBatchOutcome, EventBatchProcessor, IncomingMessage
from streams.settings import Settings
from streams.worker.collector import CollectorSchedule
from streams.worker.faust_compat import committed_offset, mark_processed, take_batches
from streams.worker.offset_holes import OffsetHoles
from streams.worker.output import Output
from streams.worker.tables import PartitionedTable

log = logging.getLogger(__name__)


def incoming(events: Sequence[faust.EventT]) -> list[IncomingMessage]:
    return [
        IncomingMessage(
            e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset, e.message.timestamp
        )
        for e in events
    ]


@dataclass
class Activity:
    """The events agent's progress, as the timer that watches for undelivered messages needs it."""

    running: bool = False  # a micro-batch is being processed
    batches: int = 0  # micro-batches processed so far


class EventsAgent:
    """Reads the events and control topics (control commands are keyed and partitioned like the events,
    so a forget-user touches the window no other code is writing) and runs the batch logic on its own
    thread, so model and store calls run off the loop and in order."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        events: EventBatchProcessor,
        windows: PartitionedTable,
        state_key: Callable[[str], str],
        output: Output,
        experiment_counts: PartitionedTable | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.events = events
        self.windows = windows
        self.state_key = state_key
        self.output = output
        self.windows_changelog = windows.changelog_topic.get_topic_name()
        self.experiment_counts = experiment_counts  # a running experiment's counts (when experiments are on)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="rtrec-events")
        self.holes: OffsetHoles[TP] = OffsetHoles()
        self.activity = Activity()
        self.collector = CollectorSchedule()

    async def run(self, stream: faust.StreamT) -> None:
        async for batch in take_batches(stream, self.settings.batch_max, self.settings.batch_within_s):
            self.activity.running = True
            try:
                messages = incoming(batch)
                await self.recover_skipped(messages)
                await self.process(messages)
            finally:
                self.activity.running = False
                self.activity.batches += 1
            self.collector.after_batch()

    def key(self, user_id: str) -> bytes:
        return self.state_key(user_id).encode("utf-8")

    async def process(self, messages: Sequence[IncomingMessage]) -> None:
        stage = self.events.metrics.stage
        partition_of = {m.key: m.partition for m in messages if m.key is not None}
        with stage("state"):
            stored = {user: self.windows.get(self.key(user)) for user in self.events.users_in(messages)}
        loop = asyncio.get_running_loop()
        # Read on the loop, where Faust's consumer keeps them.
        events_topic = self.settings.events_topic
        partitions = {m.partition for m in messages if m.topic == events_topic}
        committed = {
            partition: offset
            for partition in partitions
            if (offset := committed_offset(self.app, TP(events_topic, partition))) is not None
        }
        outcome = await loop.run_in_executor(self.worker, self._process_on_thread, messages, stored, committed)
        with stage("state"):
            written = await self.windows.write_through(
                (self.key(user_id), stored_window, partition_of[user_id.encode("utf-8")])
                for user_id, stored_window in outcome.windows.items()
            )
            for delivery in written:
                self.output.watch(self.windows_changelog, delivery)
            if outcome.experiment_counts:
                assert self.experiment_counts is not None, "an experiment runs only where its counts table exists"
                for update in outcome.experiment_counts:
                    held = self.experiment_counts.get(update.key)
                    self.experiment_counts.put(update.key, update.applied_to(held), update.partition)
        await self.send(messages, outcome, written)
        log.debug("events batch: %s", outcome.counts)

    def _process_on_thread(
        self, messages: Sequence[IncomingMessage], stored: Mapping[str, bytes | None], committed: Mapping[int, int]
    ) -> EventBatchOutcome:
        with self.events.metrics.events_thread():
            return self.events.process(messages, stored, committed)

    async def send(
        self, messages: Sequence[IncomingMessage], outcome: EventBatchOutcome, written: Sequence[asyncio.Future[Any]]
    ) -> None:
        """Sends a batch's lists and dead letters; ``written``: the deliveries of its windows to the changelog."""
        with self.events.metrics.stage("produce"):
            if self.events.cooccurrence is not None and outcome.recommendations and written:
                # A list fused with co-occurrence is replayed exactly only from the candidates its window
                # keeps (the counts move on, and a restart restores them behind), so the windows reach the
                # changelog before the lists reach their readers.
                await asyncio.wait(written)
            await self.output.recommendations(outcome.recommendations)
            await self.output.dead_letters(outcome.dead_letters)
        # A user's list answers their last message of the batch (their trigger, barring an out-of-order event).
        stamped = {m.key: m.timestamp_s for m in messages}
        sent = [stamped.get(rec.user_id.encode("utf-8")) for rec in outcome.recommendations]
        self.events.metrics.lists_sent([s for s in sent if s is not None], time.time())

    async def recover_skipped(self, messages: Sequence[IncomingMessage]) -> None:
        """Process the messages the stream jumped over before this batch (see ``streams.worker.offset_holes``)."""
        delivered = [(TP(m.topic, m.partition), m.offset) for m in messages]
        generation = self.app.consumer_generation_id
        skipped = self.holes.skipped(generation, delivered, lambda tp: committed_offset(self.app, tp))
        for tp, start, stop in skipped:
            records = await _read_back(self.settings, tp, start, stop)
            lost = [IncomingMessage(r.key, r.value, tp.topic, r.partition, r.offset) for r in records]
            log.warning(
                "%s partition %d: the stream skipped offsets %d to %d (faust-streaming #596); "
                "%d messages no worker had committed read back from the broker and processed",
                tp.topic, tp.partition, start, stop - 1, len(lost),
            )  # fmt: skip
            self.events.metrics.skipped_messages.labels(tp.topic).inc(len(lost))
            if lost:
                await self.process(lost)
            await mark_processed(self.app, tp, start, stop - 1)


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
