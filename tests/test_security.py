"""Kafka with SASL: every client authenticates, and the password never shows.

A second local broker whose only client listener is SASL_PLAINTEXT with the PLAIN
mechanism (the broker itself authenticates on it too). The topic bootstrap (admin
client), the producers, the readers and the Faust worker all connect with the same
settings; a wrong password is one clear error line that does not repeat it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.kafka_local import LocalKafka, LocalKafkaConfig, free_port
from streams.cli import main
from streams.recommend import now_ms
from streams.settings import Secret
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
