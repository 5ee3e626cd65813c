"""Kafka with SASL (every client authenticates, the password never shows), and pseudonymised state.

A second local broker whose only client listener is SASL_PLAINTEXT with the PLAIN
mechanism (the broker itself authenticates on it too). The topic bootstrap (admin
client), the producers, the readers and the Faust worker all connect with the same
settings; a wrong password is one clear error line that does not repeat it.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from encoder.config import INTEREST_BUNDLE, BundleManifest
from infra.kafka_local import LocalKafka, LocalKafkaConfig, free_port
from streams.cli import main
from streams.kafka_io import make_consumer
from streams.pseudonym import Pseudonyms
from streams.recommend import now_ms
from streams.settings import Secret
from streams.store_edge import EdgeVectorStore
from tests.harness import Pipeline

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw-for-rtrec"


def _sasl_properties(port: int, controller_port: int) -> tuple[str, ...]:
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="broker" password="broker-pw" user_broker="broker-pw" '
        f'user_rtrec="{PASSWORD}";'
    )
    return (
        f"listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name=SASL_PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms=PLAIN",
        "sasl.mechanism.inter.broker.protocol=PLAIN",
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
    )


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[LocalKafka]:
    port, controller_port = free_port(), free_port()
    config = LocalKafkaConfig(
        data_dir=Path(tempfile.mkdtemp(prefix="rtrec-kafka-sasl-")),
        port=port,
        controller_port=controller_port,
        extra_properties=_sasl_properties(port, controller_port),
    )
    broker = LocalKafka(config)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_every_client_authenticates_with_sasl(sasl_kafka: LocalKafka, models_dir: Path, tmp_path: Path) -> None:
    pipeline = Pipeline(
        sasl_kafka.config.bootstrap,
        models_dir,
        tmp_path,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="rtrec",
        kafka_sasl_password=Secret(PASSWORD),
    )
    try:
        pipeline.start()  # the admin client creates the topics; the worker joins its group
        pipeline.publish_catalog()
        events = [g.event for g in pipeline.workload.scripted_user(950, [("gaming", 3)], clock=now_ms)]
        pipeline.send_events(events)
        wanted = {e.event_id for e in events}
        outputs = pipeline.collect_until(lambda out: wanted <= out.covered_event_ids(), timeout_s=60)
        assert all(len(r.items) == 10 for r in outputs.recommendations)
        assert PASSWORD not in pipeline.worker_log()
    finally:
        pipeline.stop()


def test_a_wrong_password_is_one_line_without_the_password(
    sasl_kafka: LocalKafka, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--kafka-bootstrap", sasl_kafka.config.bootstrap, "--kafka-security-protocol", "SASL_PLAINTEXT"]
    wrong = "not-the-password-42"
    assert main([*flags, "--kafka-sasl-username", "rtrec", "--kafka-sasl-password", wrong, "topics"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("rtrec: error: ") and captured.err.count("\n") == 1, captured.err
    assert wrong not in captured.err + captured.out
    assert main([*flags, "topics"]) == 2  # SASL without credentials is refused before connecting
    assert "needs RTREC_KAFKA_SASL_USERNAME and RTREC_KAFKA_SASL_PASSWORD" in capsys.readouterr().err


def test_pseudonymised_state_holds_no_user_id_and_survives_a_restart(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    key = Secret("pseudonym-key")
    pipeline = Pipeline(
        kafka.config.bootstrap, models_dir, tmp_path, topic_partitions=4, pseudonymize_key=key, http_port=free_port()
    )
    pseudonyms = Pseudonyms(key)
    users = [pipeline.workload.scripted_user(960 + n, [("music", 4)], clock=now_ms) for n in range(6)]
    events = [g.event for user in users for g in user]
    try:
        pipeline.start()
        pipeline.publish_catalog()
        pipeline.send_events(events)
        wanted = {e.event_id for e in events}
        outputs = pipeline.collect_until(lambda out: wanted <= out.covered_event_ids(), timeout_s=60)
        ids = {e.user_id for e in events}
        assert {r.user_id for r in outputs.recommendations} >= ids  # consumers still see real ids

        # The changelog holds each window under its pseudonym, on its user's events partition.
        changelog = f"{pipeline.settings.app_id}-user-windows-changelog"
        reader = make_consumer(pipeline.settings, [changelog, pipeline.settings.events_topic])
        keys_by_partition: dict[tuple[str, bytes], set[int]] = {}
        for topic, partition, record_key in _keyed_records(reader):
            keys_by_partition.setdefault((topic, record_key), set()).add(partition)
        reader.close()
        stored_keys = {k for (topic, k) in keys_by_partition if topic == changelog}
        assert stored_keys == {pseudonyms.of(u).encode() for u in ids}
        for user in ids:
            events_partitions = keys_by_partition[pipeline.settings.events_topic, user.encode()]
            assert keys_by_partition[changelog, pseudonyms.of(user).encode()] == events_partitions

        # A restarted worker recovers the windows from those partitions, and the API finds them by real id.
        pipeline.restart_worker()
        user = events[0].user_id
        status, body = _get_json(pipeline.settings.http_port, f"/users/{user}/recommendations")
        assert status == 200 and body["window_events"] == 4 and len(body["items"]) == 10
    finally:
        pipeline.stop()
    # The users collection holds vectors under pseudonyms only.
    store = EdgeVectorStore(pipeline.settings.qdrant_local_path)
    try:
        dim = BundleManifest.read(models_dir / INTEREST_BUNDLE, "interest-encoder").dim
        store.ensure_collection(pipeline.settings.users_collection, dim)
        users_collection = pipeline.settings.users_collection
        assert set(store.fetch_vectors(users_collection, [pseudonyms.of(u) for u in ids])) == {
            pseudonyms.of(u) for u in ids
        }
        assert store.fetch_vectors(users_collection, sorted(ids)) == {}
    finally:
        store.close()


def _keyed_records(consumer: KafkaConsumer) -> Iterator[tuple[str, int, bytes]]:
    ends = consumer.end_offsets(list(consumer.assignment()))
    while any(consumer.position(tp) < end for tp, end in ends.items()):
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                if record.key is not None:
                    yield tp.topic, tp.partition, record.key


def _get_json(port: int, path: str) -> tuple[int, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, json.loads(response.read())
