"""`rtrec demo`: the whole pipeline on one machine, live, with a summary at the end.

Starts the local broker (unless a Kafka is configured), creates the topics,
trains or reuses the encoders, publishes a generated catalogue, starts a
worker process, streams drifting users' events at a chosen rate (with a few
malformed messages mixed in), shows recommendations as they arrive and ends
with counts and event→recommendation latency.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack
import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from infra.kafka_local import local_broker_for
from infra.topics import ensure_pipeline_topics
from streams.clients.kafka_io import iterate, make_consumer, make_producer, publish_items
from streams.recommend import now_ms
from streams.records import decode_deadletter, decode_recommendation, encode_event
from streams.settings import Settings
from streams.tools.worker_runner import WorkerProcess
from streams.tools.workload import Workload, WorkloadConfig


@dataclass(frozen=True)
class DemoOptions:
    events: int = 3000
    rate: float = 200.0  # events per second
    users: int = 200
    items: int = 800
    bad_every: int = 250  # one malformed message per this many events (0: none)
    show_every: int = 100  # print one live recommendation per this many
    keep_broker: bool = False
    timeout_s: float = 120.0


@dataclass
class Tally:
    sent: int = 0
    bad_sent: int = 0
    recommendations: int = 0
    dead_lettered: int = 0
    covered: set[str] = field(default_factory=set)
    latencies_ms: list[int] = field(default_factory=list)
    interest_hits: int = 0
    interest_total: int = 0
    interest_of: dict[str, str] = field(default_factory=dict)  # ground truth: event id → the user's interest
    finished: threading.Event = field(default_factory=threading.Event)  # tells the output reader to stop
    # Each run brings its own users: the same seeded event ids again would be (rightly) deduplicated.
    first_user: int = field(default_factory=lambda: secrets.randbelow(1_000_000) * 1_000)
    lock: threading.Lock = field(default_factory=threading.Lock)


DEMO_ENCODER = {"epochs": 40, "patience": 5}  # the generated workload is learnt in well under a minute


def run_demo(settings: Settings, options: DemoOptions, say: Callable[[str], None] = print) -> Tally:
    with local_broker_for(settings, say, keep=options.keep_broker):
        return _run_demo(settings, options, say)


def _run_demo(settings: Settings, options: DemoOptions, say: Callable[[str], None]) -> Tally:
    from streams.tools.stream_model import ensure_interest_encoder

    worker = None
    try:
        for topic, what in ensure_pipeline_topics(settings).items():
            say(f"topic {topic}: {what}")
        workload_config = WorkloadConfig(n_items=options.items, n_users=options.users)
        ensure_interest_encoder(
            settings.models_path, workload_config, DEMO_ENCODER, n_users=300, events_per_user=40, progress=say
        )
        workload = Workload(workload_config)
        log_path = settings.home / "worker.log"
        say(f"starting a worker (log: {log_path})…")
        worker = WorkerProcess(settings, log_path)
        worker.wait_ready(options.timeout_s)
        producer = make_producer(settings)
        publish_items(producer, settings.items_topic, workload.catalog)
        producer.flush()
        say(f"published {len(workload.catalog):,} catalogue items; waiting for the worker to index them…")
        worker.wait_caught_up(settings.items_topic, options.timeout_s)
        tally = Tally()
        # Start offsets are pinned before any event is sent, so no output can slip past the reader.
        consumer = make_consumer(settings, [settings.recommendations_topic, settings.deadletter_topic])
        consumer.seek_to_end()
        for partition in consumer.assignment():
            consumer.position(partition)
        reader = threading.Thread(
            target=_read_outputs, args=(consumer, settings, workload, tally, options, say), daemon=True
        )
        reader.start()
        _stream_events(producer, settings, workload, options, tally, say)
        producer.close()
        deadline = time.monotonic() + options.timeout_s
        while time.monotonic() < deadline and reader.is_alive():
            with tally.lock:
                if len(tally.covered) >= tally.sent - tally.bad_sent and tally.dead_lettered >= tally.bad_sent:
                    break
            time.sleep(0.2)
        tally.finished.set()
        reader.join()
        _summary(tally, workload, say)
        return tally
    finally:
        if worker is not None:
            worker.stop()


def _stream_events(
    producer: KafkaProducer,
    settings: Settings,
    workload: Workload,
    options: DemoOptions,
    tally: Tally,
    say: Callable[[str], None],
) -> None:
    interval = 1.0 / options.rate
    started = time.monotonic()
    say(f"streaming {options.events:,} events of {options.users} drifting users at {options.rate:.0f}/s…")
    for n, generated in enumerate(workload.stream(options.events, clock=now_ms, first_user=tally.first_user), start=1):
        target = started + n * interval
        pause = target - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        event = generated.event
        with tally.lock:
            tally.sent += 1
            tally.interest_of[event.event_id] = generated.interest
        producer.send(settings.events_topic, key=event.user_id.encode(), value=encode_event(event))
        if options.bad_every and n % options.bad_every == 0:
            with tally.lock:
                tally.sent += 1
                tally.bad_sent += 1
            # A malformed event as a buggy producer might send it: the wrong type for ts.
            bad = msgpack.packb(
                {
                    "v": 1,
                    "event_id": f"bad-{n}",
                    "user_id": event.user_id,
                    "item_id": event.item_id,
                    "type": "view",
                    "ts": "yesterday",
                }
            )
            producer.send(settings.events_topic, key=event.user_id.encode(), value=bad)
    producer.flush()


def _until(finished: threading.Event, consumer: KafkaConsumer) -> Iterator[tuple[str, bytes | None, bytes | None]]:
    while not finished.is_set():
        yield from iterate(consumer, timeout_s=0.5)


def _read_outputs(
    consumer: KafkaConsumer,
    settings: Settings,
    workload: Workload,
    tally: Tally,
    options: DemoOptions,
    say: Callable[[str], None],
) -> None:
    titles = {item.item_id: item.title for item in workload.catalog}
    try:
        for topic, _key, value in _until(tally.finished, consumer):
            if value is None:
                continue
            arrived = now_ms()
            if topic == settings.deadletter_topic:
                letter = decode_deadletter(value)
                with tally.lock:
                    tally.dead_lettered += 1
                say(f"  dead-letter  partition {letter.partition} offset {letter.offset}: {letter.error}")
                continue
            rec = decode_recommendation(value)
            with tally.lock:
                interest = tally.interest_of.get(rec.trigger_event_id)
            in_interest = sum(workload.category_of.get(i.item_id) == interest for i in rec.items)
            with tally.lock:
                tally.recommendations += 1
                tally.covered.update(rec.event_ids)
                tally.latencies_ms.append(arrived - rec.event_ts)
                tally.interest_hits += in_interest
                tally.interest_total += len(rec.items)
                count = tally.recommendations
            if options.show_every and count % options.show_every == 1:
                top = ", ".join(titles.get(i.item_id, i.item_id) for i in rec.items[:3])
                say(
                    f"  {rec.user_id} (now into {interest}) → {top}  "
                    f"[{in_interest}/{len(rec.items)} on-interest, {arrived - rec.event_ts} ms]"
                )
    finally:
        consumer.close()


def _summary(tally: Tally, workload: Workload, say: Callable[[str], None]) -> None:
    latencies = np.array(tally.latencies_ms or [0])
    valid = tally.sent - tally.bad_sent
    rows = [
        ("events in", f"{tally.sent:,} ({tally.bad_sent} malformed on purpose)"),
        ("valid events reflected in a recommendation", f"{len(tally.covered):,} / {valid:,}"),
        ("recommendation messages out", f"{tally.recommendations:,}"),
        ("dead-lettered", f"{tally.dead_lettered:,}"),
        (
            "latency event → recommendation p50 / p99",
            f"{np.percentile(latencies, 50):.0f} ms / {np.percentile(latencies, 99):.0f} ms",
        ),
        (
            "recommended items in the user's current interest",
            f"{tally.interest_hits / max(tally.interest_total, 1):.1%} (chance: {1 / len(workload.categories):.1%})",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    say("")
    say("summary")
    for name, value in rows:
        say(f"  {name:<{width}}  {value}")
