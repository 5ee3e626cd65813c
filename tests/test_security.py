"""Kafka with SASL and TLS (every client authenticates, the password never shows), and pseudonymised state.

A second local broker with two client listeners: SASL_PLAINTEXT with the PLAIN
mechanism (the broker itself authenticates on it too), and SASL_SSL with
SCRAM-SHA-512 behind a certificate of a throw-away CA. The topic bootstrap (admin
client), the producers, the readers and the Faust worker all connect with the same
settings; a wrong password, or a CA that did not sign the broker's certificate, is
one clear error line that does not repeat the password.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer

from encoder.config import INTEREST_BUNDLE, BundleManifest
from infra.kafka_local import LocalKafka, LocalKafkaConfig
from infra.processes import free_port
from infra.qdrant_local import LocalQdrant, LocalQdrantConfig
from streams.cli import main
from streams.clients.kafka_io import make_consumer
from streams.errors import VectorStoreError
from streams.ports import VectorPoint
from streams.pseudonym import Pseudonyms
from streams.recommend import now_ms
from streams.settings import Secret, Settings
from streams.stores.edge import EdgeVectorStore
from streams.worker.app import open_vector_store
from streams.worker.tables import windows_changelog_topic
from tests.harness import Pipeline, forget_and_ask, http_get, http_text

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw-for-rtrec"


def _tls_material(folder: Path) -> tuple[Path, Path]:
    """A throw-away CA (its certificate for the clients) and the broker's key and certificate for
    127.0.0.1 signed by it, in one PEM file as Kafka's PEM keystore reads it."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ca_extensions = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=rtrec test CA", *ca_extensions)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "broker.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.pem", "-days", "2", "-extfile", "broker.ext")  # fmt: skip
    keystore = folder / "broker-keystore.pem"
    keystore.write_text("".join((folder / name).read_text() for name in ("broker.key", "broker.pem", "ca.pem")))
    return folder / "ca.pem", keystore


def _sasl_properties(ports: SecurityPorts, keystore: Path) -> tuple[str, ...]:
    """SASL_PLAINTEXT with PLAIN (also the broker's own listener), and SASL_SSL with SCRAM-SHA-512."""
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="broker" password="broker-pw" user_broker="broker-pw" '
        f'user_rtrec="{PASSWORD}";'
    )
    return (
        f"listeners=SASL_PLAINTEXT://127.0.0.1:{ports.plain},SASL_SSL://127.0.0.1:{ports.scram_tls},"
        f"CONTROLLER://127.0.0.1:{ports.controller}",
        f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{ports.plain},SASL_SSL://127.0.0.1:{ports.scram_tls}",
        "inter.broker.listener.name=SASL_PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.mechanism.inter.broker.protocol=PLAIN",
        "listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN",
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
        "listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.ssl.keystore.type=PEM",
        f"listener.name.sasl_ssl.ssl.keystore.location={keystore}",
    )


@dataclass(frozen=True)
class SecurityPorts:
    plain: int
    scram_tls: int
    controller: int


@dataclass(frozen=True)
class SecureBroker:
    broker: LocalKafka
    ports: SecurityPorts
    ca_file: Path

    @property
    def plain_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.plain}"

    @property
    def scram_tls_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.scram_tls}"


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[SecureBroker]:
    data = Path(tempfile.mkdtemp(prefix="rtrec-kafka-sasl-"))
    ports = SecurityPorts(free_port(), free_port(), free_port())
    ca_file, keystore = _tls_material(Path(tempfile.mkdtemp(prefix="rtrec-tls-")))
    config = LocalKafkaConfig(
        data_dir=data,
        port=ports.plain,
        controller_port=ports.controller,
        extra_properties=_sasl_properties(ports, keystore),
        # KRaft takes SCRAM credentials when the storage is formatted.
        format_arguments=("--add-scram", f"SCRAM-SHA-512=[name=rtrec,password={PASSWORD}]"),
    )
    broker = LocalKafka(config)
    broker.start(with_parent=True)
    try:
        yield SecureBroker(broker, ports, ca_file)
    finally:
        broker.stop()


def _run_securely(pipeline: Pipeline) -> None:
    """Topics by the admin client, the catalogue and events by producers, lists read back: every client."""
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


def test_every_client_authenticates_with_sasl(sasl_kafka: SecureBroker, models_dir: Path, tmp_path: Path) -> None:
    _run_securely(
        Pipeline(
            sasl_kafka.plain_bootstrap,
            models_dir,
            tmp_path,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_username="rtrec",
            kafka_sasl_password=Secret(PASSWORD),
        )
    )


def test_every_client_speaks_tls_with_scram(sasl_kafka: SecureBroker, models_dir: Path, tmp_path: Path) -> None:
    _run_securely(
        Pipeline(
            sasl_kafka.scram_tls_bootstrap,
            models_dir,
            tmp_path,
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="rtrec",
            kafka_sasl_password=Secret(PASSWORD),
            kafka_ssl_cafile=str(sasl_kafka.ca_file),
        )
    )


def test_a_wrong_password_is_one_line_without_the_password(
    sasl_kafka: SecureBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--kafka-bootstrap", sasl_kafka.plain_bootstrap, "--kafka-security-protocol", "SASL_PLAINTEXT"]
    wrong = "not-the-password-42"
    assert main([*flags, "--kafka-sasl-username", "rtrec", "--kafka-sasl-password", wrong, "topics"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("rtrec: error: ") and captured.err.count("\n") == 1, captured.err
    assert wrong not in captured.err + captured.out
    assert main([*flags, "topics"]) == 2  # SASL without credentials is refused before connecting
    assert "needs RTREC_KAFKA_SASL_USERNAME and RTREC_KAFKA_SASL_PASSWORD" in capsys.readouterr().err


def test_a_broker_certificate_the_ca_did_not_sign_is_one_line(
    sasl_kafka: SecureBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--kafka-bootstrap", sasl_kafka.scram_tls_bootstrap, "--kafka-security-protocol", "SASL_SSL"]
    scram = ["--kafka-sasl-mechanism", "SCRAM-SHA-512", "--kafka-sasl-username", "rtrec"]
    # Without --kafka-ssl-cafile the system's CAs are trusted, and none of them signed the broker's certificate.
    assert main([*flags, *scram, "--kafka-sasl-password", PASSWORD, "topics"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("rtrec: error: ") and captured.err.count("\n") == 1, captured.err
    assert PASSWORD not in captured.err + captured.out
    assert "the TLS handshake failed: self-signed certificate in certificate chain" in captured.err, captured.err


QDRANT_KEY = "qdrant-key-for-rtrec"


def test_the_qdrant_server_is_reached_over_tls_with_its_api_key(
    qdrant_server: LocalQdrant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_file, _ = _tls_material(tmp_path)
    config = LocalQdrantConfig(
        tmp_path / "qdrant", qdrant_server.config.binary, http_port=free_port(), grpc_port=free_port(),
        api_key=QDRANT_KEY, tls_cert=tmp_path / "broker.pem", tls_key=tmp_path / "broker.key",
    )  # fmt: skip
    qdrant = LocalQdrant(config)  # Qdrant's own TLS (https only), the key required
    qdrant.start(with_parent=True)
    try:
        settings = Settings(
            home=tmp_path, qdrant_url=config.url, qdrant_api_key=Secret(QDRANT_KEY), qdrant_ca_cert=str(ca_file)
        )
        assert settings.qdrant_url.startswith("https://")
        store = open_vector_store(settings)
        store.ensure_collection("items", 4)
        store.upsert("items", [VectorPoint("i1", np.ones(4, dtype=np.float32), {})])
        assert list(store.fetch_vectors("items", ["i1"])) == ["i1"]
        store.close()
        wrong_key = "not-the-qdrant-key"
        refused = r"refused the request \(401 Unauthorized\): RTREC_QDRANT_API_KEY"
        failures = [
            (refused, replace(settings, qdrant_api_key=Secret(wrong_key))),
            (refused, replace(settings, qdrant_api_key=None)),
            # Without a CA file the system's CAs are trusted, and none of them signed the server's certificate.
            (
                r"TLS handshake with Qdrant at https://.* certificate verify failed.*RTREC_QDRANT_CA_CERT",
                replace(settings, qdrant_ca_cert=""),
            ),
        ]
        # The same over gRPC (Qdrant's TLS covers both interfaces).
        grpc = replace(settings, qdrant_grpc_port=config.grpc)
        store = open_vector_store(grpc)
        assert list(store.fetch_vectors("items", ["i1"])) == ["i1"]
        store.close()
        refused_grpc = r"refused the request \(UNAUTHENTICATED over gRPC\): RTREC_QDRANT_API_KEY"
        failures += [
            (refused_grpc, replace(grpc, qdrant_api_key=Secret(wrong_key))),
            (r"unreachable over gRPC .*RTREC_QDRANT_CA_CERT", replace(grpc, qdrant_ca_cert="")),
        ]
        for expected, wrong in failures:
            with pytest.raises(VectorStoreError, match=expected) as failure:
                open_vector_store(wrong).ensure_collection("items", 4)
            assert wrong_key not in str(failure.value) and QDRANT_KEY not in str(failure.value)
            assert "\n" not in str(failure.value)  # one line, naming the setting
        assert QDRANT_KEY not in caplog.text and wrong_key not in caplog.text
    finally:
        qdrant.stop()


def test_pseudonymised_state_holds_no_user_id_and_survives_a_restart(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    key = Secret("pseudonym-key")
    pipeline = Pipeline(
        kafka.config.bootstrap, models_dir, tmp_path, topic_partitions=4, pseudonymize_key=key, http_port=free_port(),
        console=True,
    )  # fmt: skip
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
        changelog = windows_changelog_topic(pipeline.settings)
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
        status, body = http_get(pipeline.settings.http_port, f"/users/{user}/recommendations")
        assert status == 200 and body["window_events"] == 4 and len(body["items"]) == 10
        # The console shows what the state holds: the window, kept under the pseudonym it names.
        status, page = http_text(pipeline.settings.http_port, f"/console/users/{user}")
        assert status == 200 and f"kept under <code>{pseudonyms.of(user)}</code>" in page
        assert page.count("<tr class=held>") == 4 and "because you " in page
        forgotten = events[-1].user_id
        forget_and_ask(pipeline, forgotten)  # the forget finds the window and the vector under its pseudonym
    finally:
        pipeline.stop()
    # The users collection holds vectors under pseudonyms only.
    store = EdgeVectorStore(pipeline.settings.qdrant_local_path)
    try:
        dim = BundleManifest.read(models_dir / INTEREST_BUNDLE, "interest-encoder").dim
        store.ensure_collection(pipeline.settings.users_collection, dim)
        users_collection = pipeline.settings.users_collection
        assert set(store.fetch_vectors(users_collection, [pseudonyms.of(u) for u in ids])) == {
            pseudonyms.of(u) for u in ids - {forgotten}
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
