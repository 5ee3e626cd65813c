"""A running pipeline for integration tests: real broker, real worker process, unique names.

Each harness gets its own topics, consumer group (app id), Qdrant folder and Faust
data folder, so tests never see each other's messages. Outputs are read by an
independent kafka-python consumer, as a consumer of the product would.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from encoder.config import TEXT_BUNDLE
from infra.topics import ensure_pipeline_topics
from streams.clients.helpers import Publisher
from streams.clients.kafka_io import delete_items, iterate, make_consumer, make_producer, publish_events, publish_items
from streams.cooccurrence import PartitionedCooccurrence
from streams.item_vectors import ItemVectorCache
from streams.pipeline import CatalogBatchProcessor, EventBatchProcessor, IncomingMessage, WindowLimits
from streams.pseudonym import Pseudonyms
from streams.recommend import Recommender
from streams.records import (
    DeadLetter,
    Event,
    Item,
    Recommendation,
    decode_deadletter,
    decode_recommendation,
    encode_item,
)
from streams.settings import Secret, Settings
from streams.tools.stream_model import ensure_interest_encoder
from streams.tools.worker_runner import WorkerProcess
from streams.tools.workload import Workload, WorkloadConfig
from streams.worker.app import load_components
from streams.worker.tables import windows_changelog_topic

TEST_WORKLOAD = WorkloadConfig(n_items=240, n_users=60, seed=7)
TEST_ENCODER = {"epochs": 40, "patience": 5, "seed": 1}  # overrides of the stream model's config
TOPICS = ("events", "items", "recommendations", "deadletter", "control")


def other_model(models_dir: Path, folder: Path) -> Path:
    """A second, differently seeded training run of the stream's model (a new user tower and item tower) in
    ``folder``, beside a copy of the text encoder; the interest bundle's path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(models_dir / TEXT_BUNDLE, folder / TEXT_BUNDLE, dirs_exist_ok=True)
    overrides = {**TEST_ENCODER, "seed": 2}
    return ensure_interest_encoder(folder, TEST_WORKLOAD, overrides, n_users=200, events_per_user=30)


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


def http_get(port: int, path: str) -> tuple[int, Any]:
    """A worker's HTTP answer: its status and its JSON body (the raw text where it is not JSON)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:  # Faust's own 503 during a rebalance is not always JSON
            return exc.code, body.decode(errors="replace")


def http_text(port: int, path: str) -> tuple[int, str]:
    """A worker's HTTP answer as text (the console's pages)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def forget_and_ask(pipeline: Pipeline, user_id: str, timeout_s: float = 60.0) -> None:
    """Forget a user who has a list, then ask the API for it: a 404 naming the forget, or the trending
    list with fallback=trending (issue 25: this answered 500 when the emptied window was read)."""
    port = pipeline.settings.http_port
    status, body = http_get(port, f"/users/{user_id}/recommendations?k=3")
    assert status == 200 and body["items"], body
    with Publisher(pipeline.settings) as publisher:
        publisher.forget_user(user_id)
    deadline = time.monotonic() + timeout_s
    while (status := http_get(port, f"/users/{user_id}/recommendations?k=3")[0]) == 200:
        assert time.monotonic() < deadline, "the forget never reached the user's window"
        time.sleep(0.2)
    status, body = http_get(port, f"/users/{user_id}/recommendations?k=3")
    assert status == 404 and "forgotten" in body["error"], (status, body)
    status, body = http_get(port, f"/users/{user_id}/recommendations?k=3&fallback=trending")
    assert status == 200 and body["source"] == "trending" and body["user_id"] == user_id, body
    assert body["items"] == http_get(port, "/trending?k=3")[1]["items"]


@dataclass
class Processors:
    """The batch logic of both agents over the real encoders and an embedded store, without a broker."""

    events: EventBatchProcessor
    catalog: CatalogBatchProcessor
    items: list[Item]  # the catalogue published to it


def processors(
    home: Path,
    models_dir: Path,
    limits: WindowLimits,
    n_items: int = 20,
    pseudonymize_key: Secret | None = None,
    cooccurrence: PartitionedCooccurrence | None = None,
) -> Processors:
    settings = Settings(home=home, model_dir=str(models_dir), pseudonymize_key=pseudonymize_key)
    parts = load_components(settings)
    parts.store.ensure_collection(settings.items_collection, parts.item_encoder.dim)
    parts.store.ensure_collection(settings.users_collection, parts.interest_encoder.dim)
    cache = ItemVectorCache(parts.store, settings.items_collection, capacity=1000, ttl_s=60)
    catalog = CatalogBatchProcessor(
        parts.text_embedder, parts.item_encoder, parts.store, items_collection=settings.items_collection,
        limits=settings.limits(), item_cache=cache,
    )  # fmt: skip
    items = Workload(TEST_WORKLOAD).catalog[:n_items]
    catalog.process([IncomingMessage(i.item_id.encode(), encode_item(i), "items", 0, n) for n, i in enumerate(items)])
    recommender = Recommender(
        parts.interest_encoder, parts.store, cache, users_collection=settings.users_collection, top_k=5,
        pseudonyms=Pseudonyms(pseudonymize_key), cooccurrence=cooccurrence,
    )  # fmt: skip
    events = EventBatchProcessor(recommender, limits, settings.limits(), cooccurrence=cooccurrence)
    return Processors(events, catalog, items)
