"""A real local Qdrant server: the production topology's vector store, without Docker.

The binary is the one ``RTREC_QDRANT_BINARY`` names, else ``qdrant`` on the PATH, else the project's
shared build (``../shared/bin/qdrant`` beside the checkout). Like the local Kafka, it runs in its own
session with a pid file in its data folder (``rtrec qdrant start`` returns, ``stop`` finds it again),
or tied to the process that started it (a test session: SIGTERM when that process dies). It is
ready when ``/readyz`` answers 200.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.processes import LocalServer, free_port, port_open, terminated_with
from streams.errors import VectorStoreError

# The server version the tests run and docker-compose.yml pins (the shared build is this release).
QDRANT_VERSION = "1.18.3"
SHARED_BINARY = Path(__file__).resolve().parents[2] / "shared" / "bin" / "qdrant"
HOW_TO_GET_ONE = (
    "no Qdrant server binary: set RTREC_QDRANT_BINARY to one (a release from github.com/qdrant/qdrant, "
    "or run the official image qdrant/qdrant and set RTREC_QDRANT_URL instead)"
)


def find_binary(configured: str = "") -> Path | None:
    """The Qdrant server binary to run: ``configured``, else ``qdrant`` on the PATH, else the shared build."""
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    on_path = shutil.which("qdrant")
    if on_path:
        return Path(on_path)
    return SHARED_BINARY if SHARED_BINARY.is_file() else None


@dataclass(frozen=True)
class LocalQdrantConfig:
    data_dir: Path
    binary: Path
    http_port: int = 16333
    grpc_port: int = 0  # 0: http_port + 1
    api_key: str = ""
    tls_cert: Path | None = None  # with tls_key: https (and TLS on gRPC) with this certificate
    tls_key: Path | None = None
    # Distributed mode: this node's peer-to-peer port, and a node of the cluster to join (empty: the first).
    p2p_port: int = 0
    bootstrap_peer: str = ""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> int:
        return self.grpc_port or self.http_port + 1


class LocalQdrant(LocalServer):
    """Start, check and stop one local Qdrant server (or a node of a local cluster)."""

    def __init__(self, config: LocalQdrantConfig, progress: Callable[[str], None] = lambda _msg: None) -> None:
        super().__init__(config.data_dir, "qdrant.pid")
        self.config = config
        self._progress = progress

    @property
    def log_file(self) -> Path:
        return self.config.data_dir / "qdrant.log"

    @property
    def storage(self) -> Path:
        return self.config.data_dir / "storage"

    def _environment(self) -> dict[str, str]:
        config = self.config
        env = {
            **os.environ,
            "QDRANT__SERVICE__HTTP_PORT": str(config.http_port),
            "QDRANT__SERVICE__GRPC_PORT": str(config.grpc),
            "QDRANT__SERVICE__HOST": "127.0.0.1",
            "QDRANT__STORAGE__STORAGE_PATH": str(self.storage),
            "QDRANT__STORAGE__SNAPSHOTS_PATH": str(config.data_dir / "snapshots"),
            "QDRANT__TELEMETRY_DISABLED": "true",
            "QDRANT__LOG_LEVEL": "WARN",
        }
        if config.api_key:
            env["QDRANT__SERVICE__API_KEY"] = config.api_key
        if config.tls_cert and config.tls_key:
            env |= {
                "QDRANT__SERVICE__ENABLE_TLS": "true",
                "QDRANT__TLS__CERT": str(config.tls_cert),
                "QDRANT__TLS__KEY": str(config.tls_key),
            }
        if config.p2p_port:
            env |= {"QDRANT__CLUSTER__ENABLED": "true", "QDRANT__CLUSTER__P2P__PORT": str(config.p2p_port)}
        return env

    def _command(self) -> list[str]:
        command = [str(self.config.binary)]
        if self.config.p2p_port:
            if self.config.bootstrap_peer:
                command += ["--bootstrap", self.config.bootstrap_peer]
            command += ["--uri", f"http://127.0.0.1:{self.config.p2p_port}"]
        return command

    def start(self, timeout_s: float = 60.0, *, with_parent: bool = False) -> str:
        """Start the server (or find it running) on its storage and return its URL.

        ``with_parent``: the server is stopped when the calling process dies, also by SIGKILL.
        """
        if self.running_pid() is not None:
            return self.config.url
        if port_open(self.config.http_port):
            raise VectorStoreError(f"port {self.config.http_port} is already in use by another process")
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._progress(f"starting Qdrant on {self.config.url} (storage {self.storage})…")
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.config.data_dir,  # Qdrant writes a marker file into its working directory
                env=self._environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=terminated_with(os.getpid()) if with_parent else None,
            )
        self._pid_file.write_text(str(self._process.pid))
        self._wait_ready(timeout_s)
        return self.config.url

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (every shard of this node ready)."""
        context = ssl._create_unverified_context() if self.config.tls_cert else None  # our own local server
        try:
            with urllib.request.urlopen(f"{self.config.url}/readyz", timeout=2, context=context) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise VectorStoreError(f"Qdrant exited with code {self._process.returncode}; see {self.log_file}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise VectorStoreError(f"Qdrant was not ready within {timeout_s:.0f} s; see {self.log_file}")


def local_qdrant_cluster(binary: Path, data_dir: Path, nodes: int = 3, timeout_s: float = 120.0) -> list[LocalQdrant]:
    """A Qdrant cluster of ``nodes`` local servers in distributed mode, started and ready: the first
    node founds it, the others join it through their peer-to-peer port."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(nodes)]
    first_p2p = ports[0][2]
    servers = [
        LocalQdrant(
            LocalQdrantConfig(
                data_dir / f"node-{n}",
                binary,
                http_port=http,
                grpc_port=grpc,
                p2p_port=p2p,
                bootstrap_peer="" if n == 1 else f"http://127.0.0.1:{first_p2p}",
            )
        )
        for n, (http, grpc, p2p) in enumerate(ports, start=1)
    ]
    for server in servers:
        server.start(timeout_s, with_parent=True)  # a joining node is ready once it has synced with the cluster
    return servers
