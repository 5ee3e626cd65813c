"""kafka-python clients for everything outside the Faust worker: producers of events and
catalogue changes, readers of the output topics, and consumer-lag checks."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, RetriableError, UnknownBrokerIdError

from streams.errors import BrokerError
from streams.records import (
    ControlCommand,
    Event,
    Item,
    Limits,
    decode_control,
    encode_control,
    encode_event,
    encode_item,
)
from streams.settings import Settings


def make_producer(settings: Settings, **overrides: object) -> KafkaProducer:
    config: dict[str, object] = {
        **settings.kafka_options(),
        "client_id": "rtrec-producer",
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": max(settings.max_message_bytes * 2, 1_048_576),
        **overrides,
    }
    try:
        return KafkaProducer(**config)
    except KafkaError as exc:
        raise BrokerError(f"cannot connect a producer to {settings.bootstrap_servers}: {exc}") from None


def make_consumer(settings: Settings, topics: Sequence[str], group_id: str | None = None) -> KafkaConsumer:
    """A reader of ``topics`` from their beginning (no group: every reader sees everything)."""
    try:
        consumer = KafkaConsumer(
            **settings.kafka_options(),
            client_id="rtrec-reader",
            isolation_level="read_committed",  # outputs of an aborted transaction (exactly_once) never show
            group_id=group_id,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
    except KafkaError as exc:
        raise BrokerError(f"cannot connect a consumer to {settings.bootstrap_servers}: {exc}") from None
    partitions: list[TopicPartition] = []
    for topic in topics:
        ids = topic_partitions(consumer, topic)
        partitions.extend(TopicPartition(topic, p) for p in ids)
    consumer.assign(partitions)
    return consumer


def topic_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float = 15.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = consumer.partitions_for_topic(topic)
        if ids:
            return set(ids)
        time.sleep(0.2)
    raise BrokerError(f"topic {topic!r} does not exist on {consumer.config['bootstrap_servers']}")


def publish_events(producer: KafkaProducer, topic: str, events: Sequence[Event]) -> None:
    for event in events:
        producer.send(topic, key=event.user_id.encode("utf-8"), value=encode_event(event))


def forget_user_records(user_ids: Sequence[str], ts_ms: int, limits: Limits) -> list[tuple[bytes, bytes]]:
    """(key, value) of a forget-user command per user, keyed by user like the events so that each
    reaches the user's worker; each checked by the worker's own decoder (InvalidRecord names the problem)."""
    records = []
    for user_id in user_ids:
        key = user_id.encode("utf-8")
        value = encode_control(ControlCommand(command="forget_user", user_id=user_id, ts=ts_ms))
        decode_control(value, key, limits)
        records.append((key, value))
    return records


def publish_items(producer: KafkaProducer, topic: str, items: Sequence[Item]) -> None:
    for item in items:
        producer.send(topic, key=item.item_id.encode("utf-8"), value=encode_item(item))


def delete_items(producer: KafkaProducer, topic: str, item_ids: Sequence[str]) -> None:
    for item_id in item_ids:
        producer.send(topic, key=item_id.encode("utf-8"), value=None)


def iterate(consumer: KafkaConsumer, timeout_s: float) -> Iterator[tuple[str, bytes | None, bytes | None]]:
    """(topic, key, value) of each record arriving within ``timeout_s`` of the previous one.

    A broker leaving a cluster mid-read is ridden through: kafka-python raises it out of ``poll`` (a retriable
    error, or a broker id its metadata no longer holds) while its leaders move, and a later poll goes on."""
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < timeout_s:
        try:
            batches = consumer.poll(timeout_ms=200)
        except (RetriableError, UnknownBrokerIdError):
            time.sleep(0.1)
            continue
        for tp, records in batches.items():
            for record in records:
                idle_since = time.monotonic()
                yield tp.topic, record.key, record.value


@contextmanager
def group_reader(settings: Settings, group_id: str) -> Iterator[KafkaConsumer]:
    """A consumer that reads consumer group ``group_id``'s committed offsets without joining it or committing."""
    try:
        consumer = KafkaConsumer(**settings.kafka_options(), group_id=group_id, enable_auto_commit=False)
    except KafkaError as exc:
        raise BrokerError(f"cannot connect a consumer to {settings.bootstrap_servers}: {exc}") from None
    try:
        yield consumer
    finally:
        consumer.close(autocommit=False)


def group_lag(settings: Settings, group_id: str, topic: str) -> int:
    """Messages on ``topic`` not yet committed by consumer group ``group_id``."""
    with group_reader(settings, group_id) as consumer:
        partitions = [TopicPartition(topic, p) for p in topic_partitions(consumer, topic)]
        ends = consumer.end_offsets(partitions)
        return sum(ends[tp] - (consumer.committed(tp) or 0) for tp in partitions)


@dataclass(frozen=True)
class TopicRecord:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


@contextmanager
def plain_consumer(settings: Settings) -> Iterator[KafkaConsumer]:
    """A ``make_consumer`` of no topic yet, closed on exit."""
    consumer = make_consumer(settings, [])
    try:
        yield consumer
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str, wait_s: float = 2.0) -> dict[int, int]:
    """The topic's end offset per partition; empty when it does not exist (metadata can take a moment)."""
    with plain_consumer(settings) as consumer:
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(topic_partitions(consumer, topic, wait_s))]
        except BrokerError:
            return {}
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}


def read_offsets(settings: Settings, topic: str, partition: int, start: int, stop: int) -> list[TopicRecord]:
    """The records of one partition at offsets ``start`` to ``stop - 1`` (fewer where some are gone)."""
    chunks = read_until(settings, topic, {partition: stop}, timeout_s=60.0, starts={partition: start})
    return [record for chunk in chunks for record in chunk]


def read_uncommitted(
    settings: Settings, group_id: str, topic: str, partition: int, start: int, stop: int
) -> list[TopicRecord]:
    """``read_offsets``, less the offsets consumer group ``group_id`` has committed past (processed, by
    any of its members)."""
    with group_reader(settings, group_id) as consumer:
        committed = consumer.committed(TopicPartition(topic, partition)) or 0
    return read_offsets(settings, topic, partition, max(start, committed), stop) if committed < stop else []


def read_until(
    settings: Settings,
    topic: str,
    until: Mapping[int, int],
    timeout_s: float = 600.0,
    chunk: int = 2048,
    starts: Mapping[int, int] | None = None,
) -> Iterator[list[TopicRecord]]:
    """The topic from its start (or ``starts``) up to ``until`` (end offsets per partition), in chunks, in order
    per partition."""
    remaining = {p: end for p, end in until.items() if end > (starts or {}).get(p, 0)}
    if not remaining:
        return
    with plain_consumer(settings) as consumer:
        partitions = [TopicPartition(topic, p) for p in remaining]
        consumer.assign(partitions)
        for tp in partitions:
            if starts and tp.partition in starts:
                consumer.seek(tp, starts[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading the topic {topic!r} took over {timeout_s:.0f} s")
            batches = consumer.poll(timeout_ms=500, max_records=chunk)
            records = [
                TopicRecord(r.key, r.value, tp.partition, r.offset)
                for tp, polled in batches.items()
                for r in polled
                if r.offset < until[tp.partition]
            ]
            for tp in partitions:
                if tp.partition in remaining and consumer.position(tp) >= remaining[tp.partition]:
                    del remaining[tp.partition]
            if records:
                yield records
