"""The local broker and topic bootstrap, against the real Kafka of this session."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import NodeNotReadyError, UnknownBrokerIdError
from kafka.structs import OffsetAndMetadata

from infra.kafka_local import LocalKafka, LocalKafkaConfig, new_cluster_id
from infra.processes import free_port
from infra.qdrant_local import QDRANT_VERSION, LocalQdrant, find_binary
from infra.topics import admin_client, ensure_pipeline_topics, topic_specs
from streams.cli import main
from streams.clients.kafka_io import iterate, make_producer, read_offsets, read_uncommitted
from streams.errors import BrokerError
from streams.settings import Settings
from streams.worker.app import open_vector_store
from tests.harness import isolated_names

pytestmark = pytest.mark.integration


def test_start_is_idempotent_and_status_sees_the_broker(kafka: LocalKafka) -> None:
    pid = kafka.running_pid()
    assert pid is not None
    assert kafka.start() == kafka.config.bootstrap  # already running: the same process serves
    assert kafka.running_pid() == pid


def test_topic_bootstrap_is_idempotent_with_policies(kafka: LocalKafka) -> None:
    settings = Settings(kafka_bootstrap=kafka.config.bootstrap, topic_partitions=3).with_overrides(**isolated_names())
    assert set(ensure_pipeline_topics(settings).values()) == {"created"}
    assert set(ensure_pipeline_topics(settings).values()) == {"exists"}
    grown = ensure_pipeline_topics(settings.with_overrides(topic_partitions=4))
    assert set(grown.values()) == {"grown to 4 partitions"}
    admin = admin_client(settings)
    try:
        described = {
            t["name"]: len(t["partitions"]) for t in admin.describe_topics([s.name for s in topic_specs(settings)])
        }
        assert set(described.values()) == {4}
        configs = admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, settings.items_topic),
                ConfigResource(ConfigResourceType.TOPIC, settings.events_topic),
            ]
        )
        text = str(configs)
        assert "compact" in text
        assert str(settings.events_retention_hours * 3600 * 1000) in text
    finally:
        admin.close()


def test_a_range_of_offsets_is_read_back_from_one_partition(kafka: LocalKafka) -> None:
    settings = Settings(kafka_bootstrap=kafka.config.bootstrap, topic_partitions=2).with_overrides(**isolated_names())
    ensure_pipeline_topics(settings)
    producer = make_producer(settings)
    for n in range(10):
        producer.send(settings.events_topic, key=b"k", value=f"v{n}".encode(), partition=1)
    producer.flush()
    producer.close()
    records = read_offsets(settings, settings.events_topic, 1, 3, 7)
    assert [(r.partition, r.offset, r.value) for r in records] == [(1, n, f"v{n}".encode()) for n in range(3, 7)]
    assert read_offsets(settings, settings.events_topic, 0, 0, 0) == []
    # What a consumer group has committed past was processed: only the rest is read back.
    group = KafkaConsumer(bootstrap_servers=kafka.config.bootstrap, group_id="readers", enable_auto_commit=False)
    partition = TopicPartition(settings.events_topic, 1)
    group.assign([partition])
    group.commit({partition: OffsetAndMetadata(5, "", -1)})
    group.close(autocommit=False)
    assert [r.offset for r in read_uncommitted(settings, "readers", settings.events_topic, 1, 3, 7)] == [5, 6]
    assert read_uncommitted(settings, "readers", settings.events_topic, 1, 3, 5) == []
    assert [r.offset for r in read_uncommitted(settings, "others", settings.events_topic, 1, 3, 5)] == [3, 4]


class _LosingABroker:
    """A consumer as kafka-python's behaves while a broker leaves its cluster: a real cluster cannot be made to
    raise at a chosen poll (the lost-broker fault in test_faults shows it does, at some poll)."""

    def __init__(self, record: ConsumerRecord) -> None:
        self.answers: list[Exception | dict[TopicPartition, list[ConsumerRecord]]] = [
            UnknownBrokerIdError(2), NodeNotReadyError(2), {TopicPartition("t", 0): [record]}
        ]  # fmt: skip

    def poll(self, timeout_ms: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        answer = self.answers.pop(0) if self.answers else {}
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_reader_rides_through_a_broker_leaving_the_cluster() -> None:
    record = ConsumerRecord("t", 0, -1, 7, 0, 0, b"k", b"v", [], None, 1, 1, -1)
    consumer = _LosingABroker(record)
    assert list(iterate(consumer, timeout_s=2.0)) == [("t", b"k", b"v")]  # type: ignore[arg-type]
    assert not consumer.answers


def test_missing_java_or_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    broker = LocalKafka(LocalKafkaConfig(data_dir=tmp_path / "data", port=free_port(), cache_dir=tmp_path / "cache"))
    with pytest.raises(BrokerError, match="'mvn' was not found on PATH"):
        broker.start()
    libs = broker.config.libs_dir
    libs.mkdir(parents=True)
    (libs / ".complete").write_text("cached")
    with pytest.raises(BrokerError, match="'java' was not found on PATH: install a Java 17"):
        broker.start()


def test_a_second_broker_can_start_stop_and_restart_with_its_data(tmp_path: Path) -> None:
    """Cached jars: no download; a restart keeps the data folder and comes back quickly."""
    broker = LocalKafka(LocalKafkaConfig(data_dir=tmp_path, port=free_port(), controller_port=free_port()))
    try:
        bootstrap = broker.start(with_parent=True)
        settings = Settings(kafka_bootstrap=bootstrap, topic_partitions=1)
        ensure_pipeline_topics(settings)
        assert broker.stop()
        assert broker.running_pid() is None
        broker.start(with_parent=True)
        assert set(ensure_pipeline_topics(settings).values()) == {"exists"}  # the data survived
    finally:
        broker.stop()
    assert not broker.stop()
    assert "Kafka Server started" in (tmp_path / "broker.log").read_text()


def test_a_broker_tied_to_its_starter_stops_when_the_starter_is_killed(tmp_path: Path) -> None:
    """A test session killed by SIGKILL runs no ``finally``: its broker must not live on, holding its heap."""
    config = LocalKafkaConfig(data_dir=tmp_path, port=free_port(), controller_port=free_port())
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from infra.kafka_local import LocalKafka, LocalKafkaConfig\n"
            f"config = LocalKafkaConfig(data_dir=Path({str(tmp_path)!r}), port={config.port}, "
            f"controller_port={config.controller_port})\n"
            "LocalKafka(config).start(with_parent=True)\n"
            "print('started', flush=True)\n"
            "time.sleep(300)\n",
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
    )
    broker = LocalKafka(config)
    try:
        assert starter.stdout is not None and starter.stdout.readline() == b"started\n"
        pid = broker.running_pid()
        assert pid is not None
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the broker outlived the process that started it"
    finally:
        starter.kill()
        broker.stop()


def _alive(pid: int) -> bool:
    """Running, not exited (an exited child of a parent that is gone may linger as a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_cluster_ids_never_look_like_options() -> None:
    ids = [new_cluster_id() for _ in range(5000)]  # about 1 in 64 random ids would start with '-'
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)


def test_the_local_qdrant_server_is_the_tested_release_and_the_cli_starts_and_stops_it(
    qdrant_server: LocalQdrant, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = subprocess.run([str(qdrant_server.config.binary), "--version"], capture_output=True, text=True)
    assert version.stdout.split() == ["qdrant", QDRANT_VERSION]
    flags = ["--home", str(tmp_path), "--local-qdrant-port", str(free_port())]
    flags += ["--qdrant-binary", str(qdrant_server.config.binary)]
    assert main([*flags, "qdrant", "start"]) == 0
    url = capsys.readouterr().out.split("Qdrant is up at ")[1].split()[0]
    try:
        assert main([*flags, "qdrant", "status"]) == 0 and "running (pid" in capsys.readouterr().out
        store = open_vector_store(Settings(qdrant_url=url))
        store.ensure_collection("probe", 4)
        store.close()
    finally:
        assert main([*flags, "qdrant", "stop"]) == 0
    assert main([*flags, "qdrant", "status"]) == 1 and "not running" in capsys.readouterr().out
    assert (tmp_path / "qdrant-server" / "storage" / "collections" / "probe").is_dir()  # under RTREC_HOME


def test_without_a_qdrant_binary_the_server_commands_say_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert find_binary(str(tmp_path / "absent")) is None
    assert main(["--qdrant-binary", str(tmp_path / "absent"), "qdrant", "start"]) == 2
    assert "RTREC_QDRANT_BINARY: no such file" in capsys.readouterr().err
