"""Helpers for your own services: publish inputs, read recommendations as typed records.

``Publisher`` checks every record with the worker's own decoder before sending it
(an ``InvalidRecord`` names the field at fault, in your process, instead of a
dead-letter record later) and keys it the way the worker needs: events and
control commands by user, catalogue changes by item.

``RecommendationReader`` yields ``Recommendation`` records from the output topic;
with a ``group_id`` several readers share the partitions and resume where the
group left off, without one each reader sees every message.

    with Publisher(Settings.from_env()) as publisher:
        publisher.publish_event(publisher.event("u-42", "item-17", "click"))

    for rec in RecommendationReader(Settings.from_env(), group_id="emails"):
        print(rec.user_id, [item.item_id for item in rec.items])
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from streams.clients.kafka_io import forget_user_records, make_producer, topic_partitions
from streams.errors import BrokerError, InvalidRecord
from streams.recommend import now_ms
from streams.records import (
    Event,
    Item,
    Recommendation,
    decode_event,
    decode_item,
    decode_recommendation,
    encode_event,
    encode_item,
)
from streams.settings import Settings


class Publisher:
    """Validated, correctly keyed writes to the events, items and control topics."""

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self.limits = settings.limits()
        self._producer = producer or make_producer(settings)

    @staticmethod
    def event(
        user_id: str,
        item_id: str,
        type: str,  # the field's name in the message contract
        *,
        ts: int | None = None,
        event_id: str | None = None,
        value: float | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Event:
        """An event stamped now, with a fresh id, unless given (give your own id to make retries idempotent)."""
        return Event(
            event_id=event_id or uuid.uuid4().hex,
            user_id=user_id,
            item_id=item_id,
            type=type,
            ts=now_ms() if ts is None else ts,
            value=value,
            context=context,
        )

    def publish_event(self, event: Event) -> None:
        key = event.user_id.encode("utf-8")
        raw = encode_event(event)
        decode_event(raw, key, self.limits, now_ms=now_ms())
        self._producer.send(self.settings.events_topic, key=key, value=raw)

    def publish_item(self, item: Item) -> None:
        """Add or change a catalogue item; it is recommendable once the worker has embedded its text."""
        key = item.item_id.encode("utf-8")
        raw = encode_item(item)
        decode_item(raw, key, self.limits)
        self._producer.send(self.settings.items_topic, key=key, value=raw)

    def delete_item(self, item_id: str) -> None:
        """A tombstone: the item is never recommended again."""
        if not item_id or len(item_id) > self.limits.max_id_chars:
            raise InvalidRecord(f"expected 1 to {self.limits.max_id_chars} characters", "item_id")
        self._producer.send(self.settings.items_topic, key=item_id.encode("utf-8"), value=None)

    def forget_user(self, user_id: str) -> None:
        """The user's events up to now are erased, their vector and cached state deleted; later events start afresh."""
        for key, value in forget_user_records([user_id], now_ms(), self.limits):
            self._producer.send(self.settings.control_topic, key=key, value=value)

    def flush(self, timeout_s: float | None = None) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise BrokerError(f"messages not delivered to {self.settings.bootstrap_servers}: {exc}") from None

    def close(self) -> None:
        self.flush()
        self._producer.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class RecommendationReader:
    """Iterate recommendations as they arrive (``from_beginning`` replays what the topic retains)."""

    def __init__(self, settings: Settings, *, group_id: str | None = None, from_beginning: bool = False) -> None:
        self.settings = settings
        topic = settings.recommendations_topic
        try:
            self._consumer = KafkaConsumer(
                **settings.kafka_options(),
                client_id="rtrec-recommendation-reader",
                isolation_level="read_committed",  # outputs of an aborted transaction (exactly_once) never show
                group_id=group_id,
                auto_offset_reset="earliest" if from_beginning else "latest",
                enable_auto_commit=group_id is not None,
            )
        except KafkaError as exc:
            raise BrokerError(f"cannot connect a consumer to {settings.bootstrap_servers}: {exc}") from None
        if group_id is not None:
            self._consumer.subscribe([topic])
            return
        partitions = [TopicPartition(topic, p) for p in topic_partitions(self._consumer, topic)]
        self._consumer.assign(partitions)
        if from_beginning:
            self._consumer.seek_to_beginning(*partitions)
        else:
            self._consumer.seek_to_end(*partitions)
            for partition in partitions:
                self._consumer.position(partition)  # pins "now": nothing sent after this line is missed

    def poll(self, timeout_s: float = 1.0) -> list[Recommendation]:
        """What arrived within ``timeout_s`` (possibly nothing)."""
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        return [decode_recommendation(r.value) for records in batches.values() for r in records if r.value]

    def __iter__(self) -> Iterator[Recommendation]:
        while True:
            yield from self.poll()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> RecommendationReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
