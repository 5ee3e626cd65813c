"""What the agents send: lists and dead letters, straight to Faust's producer."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any, cast

import faust

from streams.metrics import WorkerMetrics
from streams.records import DeadLetter, Recommendation, encode_deadletter, encode_recommendation
from streams.settings import Settings

log = logging.getLogger(__name__)


class Output:
    """Sends through the producer Faust flushes before it commits, so delivery stays at-least-once.

    Straight to the producer: ``Topic.send``'s per-message machinery cost 3x as much (measured).
    A record the broker refuses after the producer's retries is logged and counted
    (``rtrec_undelivered_total``): Faust's flush before a commit waits for deliveries but does not
    check them, so such a record is lost and must at least be seen.
    """

    def __init__(self, app: faust.App, settings: Settings, metrics: WorkerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        delivery = await self.app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)
        self.watch(topic, cast(asyncio.Future, delivery))

    def watch(self, topic: str, delivery: asyncio.Future[Any]) -> None:
        """Log and count ``delivery`` should the broker refuse it (see the class)."""
        delivery.add_done_callback(functools.partial(self._report_undelivered, topic))

    async def recommendations(self, recs: Sequence[Recommendation]) -> None:
        for rec in recs:
            await self.send(
                self.settings.recommendations_topic, rec.user_id.encode("utf-8"), encode_recommendation(rec)
            )

    async def dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        self.metrics.dead_lettered(letters)
        for letter in letters:
            await self.send(self.settings.deadletter_topic, letter.key, encode_deadletter(letter))

    def _report_undelivered(self, topic: str, delivery: asyncio.Future[Any]) -> None:
        if not delivery.cancelled() and (error := delivery.exception()) is not None:
            log.error("a record for %s was not delivered and is lost: %r", topic, error)
            self.metrics.undelivered.labels(topic).inc()
