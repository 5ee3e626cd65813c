"""Idempotent topic bootstrap with kafka-python's admin client.

Used by `rtrec topics`, the demo, the tests and the docker-compose bootstrap
service alike. Running it twice changes nothing; a topic that exists with
fewer partitions than asked is grown, and its configs are brought in line.
A run with topics of its own (`rtrec bench`) deletes them when it is done.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streams.errors import BrokerError
from streams.settings import Settings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic the pipeline reads or writes, with its retention policy."""
    p, r = settings.topic_partitions, settings.topic_replication
    durable = {"min.insync.replicas": str(settings.topic_min_insync_replicas)}
    return [
        TopicSpec(
            settings.events_topic, p, r, durable | {"retention.ms": str(settings.events_retention_hours * 3600 * 1000)}
        ),
        # The catalog is a table: compaction keeps the latest version of every item, tombstones delete.
        TopicSpec(settings.items_topic, p, r, durable | {"cleanup.policy": "compact"}),
        TopicSpec(settings.recommendations_topic, p, r, durable | {"retention.ms": str(DAY_MS)}),
        TopicSpec(settings.deadletter_topic, p, r, durable | {"retention.ms": str(14 * DAY_MS)}),
        TopicSpec(settings.control_topic, p, r, durable | {"retention.ms": str(7 * DAY_MS)}),
    ]


def admin_client(settings: Settings, timeout_s: float = 30.0) -> KafkaAdminClient:
    unverified = _tls_failure(settings, certificate_only=True)
    if unverified:  # kafka-python would retry for the whole timeout; a certificate does not get verified later
        raise BrokerError(f"no Kafka broker reachable at {settings.bootstrap_servers}{unverified}")
    try:
        return KafkaAdminClient(
            **settings.kafka_options(),
            client_id="rtrec-admin",
            request_timeout_ms=15000,
            bootstrap_timeout_ms=int(timeout_s * 1000),
        )
    except KafkaError as exc:
        raise BrokerError(
            f"no Kafka broker reachable at {settings.bootstrap_servers} ({type(exc).__name__}){_tls_failure(settings)}"
        ) from None


def _tls_failure(settings: Settings, certificate_only: bool = False) -> str:
    """Why a TLS handshake with the first bootstrap server fails ('' if it does not, or, with
    ``certificate_only``, if it fails for another reason than the broker's certificate, such as a broker
    not up yet): kafka-python only logs it, and then times out as if no broker were there."""
    context = settings.kafka_ssl_context()
    if context is None:
        return ""
    host, _, port = settings.bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return ""
    except ssl.SSLCertVerificationError as exc:
        return (
            f"; the TLS handshake failed: {exc.verify_message} "
            "(RTREC_KAFKA_SSL_CAFILE must name the CA that signed the broker's certificate)"
        )
    except (OSError, ValueError) as exc:
        return "" if certificate_only else f"; the TLS handshake failed: {exc}"


def delete_topics_named(settings: Settings, prefixes: Sequence[str]) -> list[str]:
    """Delete every topic whose name starts with one of ``prefixes`` (a finished run's own); returns their names."""
    admin = admin_client(settings)
    try:
        doomed = sorted(t for t in admin.list_topics() if t.startswith(tuple(prefixes)))
        if doomed:
            admin.delete_topics(doomed)
        return doomed
    except KafkaError as exc:
        raise BrokerError(f"deleting topics on {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        admin.close()


def ensure_topics(settings: Settings, specs: list[TopicSpec]) -> dict[str, str]:
    """Create missing topics, grow partitions, apply configs. Returns {topic: what was done}."""
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        report: dict[str, str] = {}
        missing = [s for s in specs if s.name not in existing]
        if missing:
            # Another bootstrapper may win the race; the checks below still apply.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    {
                        s.name: {
                            "num_partitions": s.partitions,
                            "replication_factor": s.replication,
                            "configs": s.configs,
                        }
                        for s in missing
                    },
                    wait_for_metadata=True,
                )
            for s in missing:
                report[s.name] = "created"
        present = [s for s in specs if s.name in existing]
        if present:
            described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([s.name for s in present])}
            grow = {s.name: s.partitions for s in present if described.get(s.name, 0) < s.partitions}
            if grow:
                admin.create_partitions(grow)
            admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.name, configs=s.configs) for s in present])
            for s in present:
                report[s.name] = f"grown to {s.partitions} partitions" if s.name in grow else "exists"
        return report
    except KafkaError as exc:
        raise BrokerError(f"topic bootstrap on {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        admin.close()


def ensure_pipeline_topics(settings: Settings) -> dict[str, str]:
    return ensure_topics(settings, topic_specs(settings))
