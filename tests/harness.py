"""A running pipeline for integration tests: real broker, real worker process, unique names.

Each harness gets its own topics, consumer group (app id), Qdrant folder and Faust
data folder, so tests never see each other's messages. Outputs are read by an
independent kafka-python consumer, as a consumer of the product would.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from infra.topics import ensure_pipeline_topics
from streams.clients.kafka_io import delete_items, iterate, make_consumer, make_producer, publish_events, publish_items
from streams.records import (
    DeadLetter,
    Event,
    Item,
    Recommendation,
    decode_deadletter,
    decode_recommendation,
)
from streams.settings import Settings
from streams.tools.worker_runner import WorkerProcess
from streams.tools.workload import Workload, WorkloadConfig
from streams.worker.windows import windows_changelog_topic

TEST_WORKLOAD = WorkloadConfig(n_items=240, n_users=60, seed=7)
TOPICS = ("events", "items", "recommendations", "deadletter", "control")


def isolated_names() -> dict[str, str]:
    """Settings giving a test its own topics and consumer group on the shared broker."""
    suffix = uuid.uuid4().hex[:8]
    return {"app_id": f"rtrec-test-{suffix}", **{f"{topic}_topic": f"t{suffix}.{topic}" for topic in TOPICS}}


@dataclass
class Outputs:
    recommendations: list[Recommendation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def by_user(self) -> dict[str, list[Recommendation]]:
        grouped: dict[str, list[Recommendation]] = defaultdict(list)
        for rec in self.recommendations:
            grouped[rec.user_id].append(rec)
        return grouped

    def covered_event_ids(self) -> set[str]:
        return {event_id for rec in self.recommendations for event_id in rec.event_ids}

    def dead_lettered_event_ids(self) -> set[str]:
        ids = set()
        for letter in self.dead_letters:
            try:
                ids.add(msgpack.unpackb(letter.value)["event_id"])
            except (ValueError, TypeError, KeyError, msgpack.ExtraData):
                continue
        return ids

    def accounted_event_ids(self) -> set[str]:
        return self.covered_event_ids() | self.dead_lettered_event_ids()


class Pipeline:
    def __init__(self, bootstrap: str, models: Path, home: Path, **settings: object) -> None:
        self.settings = Settings(
            home=home,
            kafka_bootstrap=bootstrap,
            model_dir=str(models),
            topic_partitions=2,
            batch_within_s=0.02,
        ).with_overrides(**isolated_names(), **settings)
        self.workload = Workload(TEST_WORKLOAD)
        self.producer = make_producer(self.settings)
        self.outputs = Outputs()
        self.deleted: set[str] = set()  # items this pipeline's tests removed from the shared catalogue
        self._reader = None
        self.worker: WorkerProcess | None = None
        self.log_path = home / "worker.log"

    def start(self) -> Pipeline:
        ensure_pipeline_topics(self.settings)
        self._reader = make_consumer(
            self.settings, [self.settings.recommendations_topic, self.settings.deadletter_topic]
        )
        self.worker = WorkerProcess(self.settings, self.log_path)
        self.worker.wait_ready()
        return self

    def restart_worker(self) -> None:
        """Stop the worker gracefully and start a new one with the same settings and state folder."""
        assert self.worker is not None
        self.worker.stop()
        self.worker = WorkerProcess(self.settings, self.log_path)
        self.worker.wait_ready()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self._reader is not None:
            self._reader.close()
        self.producer.close()

    def worker_log(self) -> str:
        return self.worker.log() if self.worker is not None else ""

    # ------------------------------------------------------------ inputs

    def publish_catalog(self, items: Sequence[Item] | None = None) -> None:
        publish_items(self.producer, self.settings.items_topic, list(items or self.workload.catalog))
        self.producer.flush()
        self.wait_caught_up(self.settings.items_topic)

    def delete_items(self, item_ids: Sequence[str]) -> None:
        self.deleted.update(item_ids)
        delete_items(self.producer, self.settings.items_topic, item_ids)
        self.producer.flush()
        self.wait_caught_up(self.settings.items_topic)

    def send_events(self, events: Sequence[Event]) -> None:
        publish_events(self.producer, self.settings.events_topic, events)
        self.producer.flush()

    def send_raw(self, key: bytes | None, value: bytes | None) -> None:
        self.producer.send(self.settings.events_topic, key=key, value=value)

    def wait_caught_up(self, topic: str, timeout_s: float = 90.0) -> None:
        """Until the worker has committed everything on ``topic``."""
        assert self.worker is not None
        self.worker.wait_caught_up(topic, timeout_s)

    # ------------------------------------------------------------ outputs

    def collect_until(self, done: Callable[[Outputs], bool], timeout_s: float = 60.0) -> Outputs:
        assert self._reader is not None
        deadline = time.monotonic() + timeout_s
        while not done(self.outputs):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out: {len(self.outputs.recommendations)} recommendations, "
                    f"{len(self.outputs.dead_letters)} dead letters so far\n{self.worker_log()[-3000:]}"
                )
            self._check_worker()
            for topic, _key, value in iterate(self._reader, timeout_s=0.3):
                assert value is not None
                if topic == self.settings.recommendations_topic:
                    self.outputs.recommendations.append(decode_recommendation(value))
                else:
                    self.outputs.dead_letters.append(decode_deadletter(value))
        return self.outputs

    def stored_windows(self, keys: set[bytes], timeout_s: float = 60.0) -> dict[bytes, bytes | None]:
        """The newest changelog record of each key of the window table, read from the broker."""
        changelog = windows_changelog_topic(self.settings)
        consumer = make_consumer(self.settings, [changelog])
        try:
            ends = consumer.end_offsets(list(consumer.assignment()))
            latest: dict[bytes, bytes | None] = {}
            deadline = time.monotonic() + timeout_s
            while any(consumer.position(tp) < end for tp, end in ends.items()) and time.monotonic() < deadline:
                for _topic, key, value in iterate(consumer, timeout_s=0.5):
                    if key in keys:
                        latest[key] = value
            return latest
        finally:
            consumer.close()

    def _check_worker(self) -> None:
        if self.worker is not None:
            self.worker.check_alive()
