"""The worker's housekeeping timers: the look for fetched-but-undelivered events, and the lag gauge.

An exception out of a Faust timer crashes the worker, so each catches what a rebalance or a broker
outage makes the consumer raise (``HOUSEKEEPING_ERRORS``) and tries again at its next tick.
"""

from __future__ import annotations

import asyncio
import logging

import faust
from aiokafka.errors import KafkaError
from faust.types import TP

from streams.metrics import WorkerMetrics
from streams.settings import Settings
from streams.worker.events_agent import EventsAgent
from streams.worker.faust_compat import committed_offset
from streams.worker.offset_holes import UndeliveredWatch

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0  # how often the timers run
HOUSEKEEPING_ERRORS = (KafkaError, asyncio.TimeoutError)


class UndeliveredLook:
    """Seeks back the event partitions whose fetched messages never reached the stream
    (``streams.worker.offset_holes``; faust-streaming #596)."""

    def __init__(self, app: faust.App, settings: Settings, agent: EventsAgent) -> None:
        self.app = app
        self.agent = agent
        self.inputs = {settings.events_topic, settings.control_topic}
        self.watch: UndeliveredWatch[TP] = UndeliveredWatch()

    async def stalled_partitions(self) -> list[tuple[TP, int, int]] | None:
        """``UndeliveredWatch.stalled`` for the event partitions now; None when this look proves nothing
        (a batch ran or a rebalance came, before or while the consumer was asked)."""
        app, activity = self.app, self.agent.activity
        look = (app.rebalancing_count, activity.batches)
        if activity.running or app.rebalancing:
            return None
        generation = app.consumer_generation_id
        offsets = {}
        for tp in sorted(tp for tp in app.consumer.assignment() if tp.topic in self.inputs):
            position = await app.consumer.position(tp)
            if position is not None:
                offsets[tp] = (self.agent.holes.expected(generation, tp, committed_offset(app, tp)), position)
        if activity.running or look != (app.rebalancing_count, activity.batches):
            return None
        return self.watch.stalled(look, offsets)

    async def tick(self) -> None:
        try:
            stalled = await self.stalled_partitions()
            if stalled is None:
                self.watch.busy()
            for tp, expected, position in stalled or ():
                log.warning(
                    "%s partition %d: the consumer fetched up to offset %d, the stream delivered nothing from "
                    "%d on (faust-streaming #596); seeking back to %d to have them delivered",
                    tp.topic, tp.partition, position - 1, expected, expected,
                )  # fmt: skip
                self.agent.events.metrics.skipped_messages.labels(tp.topic).inc(position - expected)
                await self.app.consumer.seek_wait({tp: expected})
        except HOUSEKEEPING_ERRORS as exc:
            # A rebalance can take a partition away mid-look (IllegalStateError): the next look starts afresh.
            log.info("the look for undelivered messages was cut short (%r); looking again afresh", exc)
            self.watch.busy()


class LagGauge:
    """Consumer lag per input partition, from the broker's end offsets, not from fetched records:
    a stalled worker fetches none."""

    def __init__(self, app: faust.App, settings: Settings, metrics: WorkerMetrics) -> None:
        self.app = app
        self.inputs = {settings.events_topic, settings.control_topic, settings.items_topic}
        self.metrics = metrics

    async def tick(self) -> None:
        app = self.app
        assigned = sorted(tp for tp in app.consumer.assignment() if tp.topic in self.inputs)
        uncommitted = [tp for tp in assigned if committed_offset(app, tp) is None]
        try:
            ends = await app.consumer.highwaters(*assigned) if assigned else {}
            starts = await app.consumer.earliest_offsets(*uncommitted) if uncommitted else {}
        except HOUSEKEEPING_ERRORS as exc:  # a broker away or a rebalance: a gauge is no reason to crash
            log.warning("consumer lag not refreshed (%r); trying again in %.0f s", exc, LAG_INTERVAL_S)
            return
        lag = self.metrics.consumer_lag
        lag.clear()  # partitions revoked since the last tick leave the gauge
        for tp in assigned:
            position = committed_offset(app, tp)
            done = starts.get(tp, 0) if position is None else position
            lag.labels(tp.topic, str(tp.partition)).set(max(ends.get(tp, done) - done, 0))
