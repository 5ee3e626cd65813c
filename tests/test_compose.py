"""The dev cluster's compose file agrees with the code it runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from infra.kafka_local import KAFKA_VERSION
from streams.cli import build_parser
from streams.settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def _services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_setting_passed_to_a_service_is_known() -> None:
    for name, service in _services().items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        if any(k.startswith("RTREC_") for k in env):
            Settings.from_env(env)  # raises on an unknown or malformed setting
            assert env["RTREC_KAFKA_BOOTSTRAP"] == "kafka:9092", name


def test_services_run_real_subcommands_and_depend_on_existing_services() -> None:
    services = _services()
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for name, service in services.items():
        if "build" in service:
            assert service["command"][0] in commands, name
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, (name, dependency)
    assert services["bootstrap"]["command"] == ["topics"]  # the same bootstrap as `rtrec topics`


def test_compose_kafka_is_the_version_the_local_broker_runs() -> None:
    assert _services()["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
