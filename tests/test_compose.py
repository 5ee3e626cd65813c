"""The dev cluster's files agree with the code they run.

Where the compose tool is installed, `docker compose config` validates the file; everywhere,
the checks below tie it to the code: settings the services pass, subcommands they run,
Dockerfile stages they build, the dependency graph, mounted files, the worker image's
requirements, and the metrics the Prometheus scrape and the Grafana dashboard read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.kafka_local import KAFKA_VERSION
from infra.qdrant_local import QDRANT_VERSION
from streams.cli import build_parser
from streams.metrics import WorkerMetrics
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_tool_accepts_the_file_where_it_is_installed() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose tool is not installed here; the structural checks below still run")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_setting_passed_to_a_service_is_known() -> None:
    for name, service in _services().items():
        env = _env(service)
        if any(k.startswith("RTREC_") for k in env):
            Settings.from_env(env)  # raises on an unknown or malformed setting
            assert env["RTREC_KAFKA_BOOTSTRAP"] == "kafka:9092", name


def test_services_run_real_subcommands_from_real_dockerfile_stages() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    built = {name: service for name, service in _services().items() if "build" in service}
    assert {"bootstrap", "trainer", "worker", "worker-gpu", "producer"} <= set(built)
    for name, service in built.items():
        assert service["command"][0] in commands, name
        assert service["build"]["target"] in stages, name
        needs_torch = service["command"][0] == "train"
        assert (service["build"]["target"] == "trainer") == needs_torch, name  # only training carries torch
    assert _services()["bootstrap"]["command"] == ["topics"]  # the same bootstrap as `rtrec topics`


def test_dependencies_exist_and_their_conditions_can_be_met() -> None:
    compose = _compose()
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for dependency in depends:
            assert dependency in services, (name, dependency)
            condition = depends[dependency]["condition"] if isinstance(depends, dict) else "service_started"
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", (name, dependency)
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    assert "gpu" in services["worker-gpu"]["profiles"]
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_compose_kafka_is_the_version_the_local_broker_runs() -> None:
    assert _services()["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_compose_qdrant_is_the_version_the_tests_run() -> None:
    # The server adapter skips qdrant-client's version check: what vouches for a server version is the
    # contract suite and the fault tests, which run against this release (infra.qdrant_local).
    assert _services()["qdrant"]["image"] == f"qdrant/qdrant:v{QDRANT_VERSION}"


def test_health_checks_and_scrapes_use_the_ports_the_worker_serves() -> None:
    worker = _services()["worker"]
    env = Settings.from_env(_env(worker))
    assert f"127.0.0.1:{env.http_port}/ready" in " ".join(worker["healthcheck"]["test"])
    assert any(port.endswith(f":{env.http_port}") for port in worker["ports"])
    scrape = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0] == {"names": ["worker"], "type": "A", "port": env.metrics_port}


def test_the_dashboard_reads_only_metrics_the_worker_exports() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {m.name + end for m in WorkerMetrics().registry.collect() for end in suffixes[m.type]}
    dashboard = json.loads((ROOT / "infra/grafana/dashboards/rtrec.json").read_text())
    datasource = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    read = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
            read |= set(re.findall(r"\brtrec_[a-z_]+", target["expr"]))
    assert read and read <= exported, read - exported
    assert {"rtrec_consumer_lag", "rtrec_stage_seconds_bucket", "rtrec_dead_letters_total"} <= read
    provider = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/rtrec.yml").read_text())
    mounts = _services()["grafana"]["volumes"]
    assert any(m.endswith(":" + provider["providers"][0]["options"]["path"] + ":ro") for m in mounts)


def test_the_worker_image_pins_what_the_lock_pins() -> None:
    lock = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line)
    lock["onnxruntime"] = lock["onnxruntime-gpu"]  # the CPU image takes the CPU build of the same release
    wanted = [
        line.split("==")
        for line in (ROOT / "infra/docker/worker-requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert wanted and all(lock.get(name) == version for name, version in wanted), wanted


def test_the_worker_and_its_commands_run_without_torch() -> None:
    modules = ", ".join(
        [
            "streams.cli",
            "streams.worker.app",
            "streams.worker.http_api",
            "streams.clients.helpers",
            "streams.clients.catalog_load",
            "infra.topics",
        ]
    )
    training = ("torch", "transformers", "onnx", "scipy", "matplotlib")
    probe = f"import sys, {modules}; print([m for m in {training!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
