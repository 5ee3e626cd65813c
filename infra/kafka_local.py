"""A real single-node Apache Kafka (KRaft) assembled from Maven Central, no Docker.

The broker's jars are resolved once with the machine's Maven into a cache folder
(``~/.cache/rtrec/kafka-<version>`` unless told otherwise); every later start
reuses them without touching the network. The broker runs as a child process
in its own session so that ``rtrec broker start`` can return and
``rtrec broker stop`` can find it again through a pid file in the data folder.
A broker started for one process only (a test session, a bench) is tied to it
instead: on Linux it is sent SIGTERM when that process dies, however it dies.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from infra.processes import LocalServer, free_port, port_open, terminated_with
from streams.errors import BrokerError

if TYPE_CHECKING:
    from streams.settings import Settings

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
READY_LINE = "Kafka Server started"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rtrec</groupId><artifactId>local-kafka</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

# Only the line that says the server is up is kept at INFO: the rest of the broker is quiet.
_LOG4J2 = """<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rtrec"


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them: 22 URL-safe base64 characters, never starting with
    '-' (the storage tool, like other command lines, would read such an id as an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class LocalKafkaConfig:
    data_dir: Path
    port: int = 19092
    controller_port: int = 0  # 0: port + 1
    cache_dir: Path = field(default_factory=default_cache_dir)
    version: str = KAFKA_VERSION
    heap: str = "768m"
    # Extra server.properties lines (e.g. a SASL listener for security tests).
    extra_properties: tuple[str, ...] = ()
    # Extra `kafka-storage format` arguments: KRaft takes SCRAM credentials there (--add-scram).
    format_arguments: tuple[str, ...] = ()
    # A node of a local cluster (``local_cluster``): its id, every node's (id, controller port) and the
    # cluster id they share. Empty: a cluster of one.
    node_id: int = 1
    voters: tuple[tuple[int, int], ...] = ()
    cluster_id: str = ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def libs_dir(self) -> Path:
        return self.cache_dir / f"kafka-{self.version}" / "libs"


class LocalKafka(LocalServer):
    """Start, check and stop one local KRaft broker (broker and controller in one process)."""

    def __init__(self, config: LocalKafkaConfig, progress: Callable[[str], None] = lambda _msg: None) -> None:
        super().__init__(config.data_dir, "broker.pid")
        self.config = config
        self._progress = progress
        self._log_offset = 0  # where this start's part of the log begins

    @property
    def log_file(self) -> Path:
        return self.config.data_dir / "broker.log"

    @property
    def _controller_port(self) -> int:
        return self.config.controller_port or self.config.port + 1

    # ------------------------------------------------------------ assembly

    @staticmethod
    def _require(tool: str, hint: str) -> str:
        path = shutil.which(tool)
        if path is None:
            raise BrokerError(f"'{tool}' was not found on PATH: {hint}")
        return path

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        if java_home and (Path(java_home) / "bin" / "java").exists():
            return str(Path(java_home) / "bin" / "java")
        return self._require("java", "install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)")

    def ensure_runtime(self) -> Path:
        """Resolve the broker's jars from Maven Central once; later calls are offline."""
        libs = self.config.libs_dir
        marker = libs / ".complete"
        if marker.exists():
            return libs
        mvn = self._require("mvn", "install Apache Maven (e.g. `apt-get install maven`) to fetch Kafka's jars once")
        self._java()
        work = libs.parent / "resolve"
        work.mkdir(parents=True, exist_ok=True)
        (work / "pom.xml").write_text(_POM.format(kafka=self.config.version, log4j=LOG4J_VERSION))
        self._progress(f"fetching Apache Kafka {self.config.version} jars from Maven Central (once)…")
        tmp_libs = libs.parent / "libs.partial"
        shutil.rmtree(tmp_libs, ignore_errors=True)
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp_libs}",
            ],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise BrokerError("Maven could not fetch Kafka's jars: " + " | ".join(tail))
        shutil.rmtree(libs, ignore_errors=True)
        tmp_libs.rename(libs)
        marker.write_text(self.config.version)
        return libs

    def _write_config(self) -> Path:
        data = self.config.data_dir
        cport = self._controller_port
        voters = self.config.voters or ((self.config.node_id, cport),)
        replicas = min(len(voters), 3)  # internal topics: replicated as far as the cluster allows
        lines = [
            "process.roles=broker,controller",
            f"node.id={self.config.node_id}",
            "controller.quorum.voters=" + ",".join(f"{node}@127.0.0.1:{port}" for node, port in voters),
            "controller.listener.names=CONTROLLER",
            f"listeners=PLAINTEXT://127.0.0.1:{self.config.port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.config.port}",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={data / 'logs'}",
            # With one broker, internal topics must have one replica or groups and transactions hang.
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=1",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={max(replicas - 1, 1)}",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={max(replicas - 1, 1)}",
            # A write acknowledged by all in-sync replicas is on two brokers at least, where there are three.
            f"min.insync.replicas={max(replicas - 1, 1)}",
            "group.initial.rebalance.delay.ms=0",
            # The 128 MiB default would be taken from a small heap.
            "log.cleaner.dedupe.buffer.size=16777216",
            "num.network.threads=2",
            "num.io.threads=4",
            "auto.create.topics.enable=false",
            *self.config.extra_properties,
        ]
        path = data / "server.properties"
        path.write_text("\n".join(lines) + "\n")
        (data / "log4j2.xml").write_text(_LOG4J2)
        return path

    def _format_storage(self, libs: Path, properties: Path) -> None:
        if (self.config.data_dir / "logs" / "meta.properties").exists():
            return
        cluster_id = self.config.cluster_id or new_cluster_id()
        result = subprocess.run(
            [
                self._java(),
                "-cp",
                f"{libs}/*",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                *self.config.format_arguments,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed: {(result.stdout + result.stderr).strip()[-400:]}")

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60.0, *, with_parent: bool = False, wait: bool = True) -> str:
        """Start the broker (or find it running) and return its bootstrap address.

        ``with_parent``: the broker is stopped when the calling process dies, also by SIGKILL, where a
        ``stop`` in a ``finally`` never runs (each orphan would keep its heap, up to ``heap``, for good).
        ``wait``: until it is ready; a node of a cluster is only ready once a quorum of nodes runs, so a
        cluster starts every node first and then waits (``local_cluster``).
        """
        if self.running_pid() is not None:
            return self.config.bootstrap
        if port_open(self.config.port):
            raise BrokerError(f"port {self.config.port} is already in use by another process")
        libs = self.ensure_runtime()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        properties = self._write_config()
        self._format_storage(libs, properties)
        cmd = [
            self._java(),
            "-Xms256m",
            f"-Xmx{self.config.heap}",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j2.configurationFile={(self.config.data_dir / 'log4j2.xml').resolve()}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            str(properties),
        ]
        self._progress(f"starting Kafka {self.config.version} on {self.config.bootstrap}…")
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        log = self.log_file.open("ab")
        self._process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminated_with(os.getpid()) if with_parent else None,
        )
        log.close()
        self._pid_file.write_text(str(self._process.pid))
        if wait:
            self.wait_ready(timeout_s)
        return self.config.bootstrap

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        offset = self._log_offset
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise BrokerError(f"Kafka exited with code {self._process.returncode}; see {self.log_file}")
            with self.log_file.open("rb") as f:
                f.seek(max(0, offset - 4096))
                if READY_LINE.encode() in f.read() and port_open(self.config.port):
                    return
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"Kafka did not start within {timeout_s:.0f} s; see {self.log_file}")


def local_cluster(
    data_dir: Path, nodes: int = 3, progress: Callable[[str], None] = lambda _msg: None
) -> list[LocalKafka]:
    """A KRaft cluster of ``nodes`` local brokers (each a controller too) on free ports, configured but not
    started: start each with ``wait=False``, then ``wait_ready`` each."""
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    voters = tuple((node, controller) for node, (_, controller) in enumerate(ports, start=1))
    cluster_id = new_cluster_id()
    return [
        LocalKafka(
            LocalKafkaConfig(
                data_dir=data_dir / f"node-{node}",
                port=port,
                controller_port=controller,
                node_id=node,
                voters=voters,
                cluster_id=cluster_id,
                heap="512m",
            ),
            progress,
        )
        for node, (port, controller) in enumerate(ports, start=1)
    ]


@contextmanager
def local_broker_for(settings: Settings, say: Callable[[str], None], keep: bool = False) -> Iterator[None]:
    """The local broker running for the body when ``settings`` point at it (no RTREC_KAFKA_BOOTSTRAP);
    stopped afterwards if it was started here and ``keep`` is false."""
    if not settings.uses_local_kafka:
        yield
        return
    broker = LocalKafka(LocalKafkaConfig(data_dir=settings.kafka_data_path, port=settings.local_kafka_port), say)
    started_here = broker.running_pid() is None
    broker.start(with_parent=not keep)
    try:
        yield
    finally:
        if started_here and not keep:
            broker.stop()
