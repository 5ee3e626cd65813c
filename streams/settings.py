"""The one settings object, read from ``RTREC_*`` environment variables once at start.

Every field is documented in the README's configuration table (a test keeps the two
in step). CLI flags override environment values through ``Settings.with_overrides``.
Nothing reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from encoder.config import PRECISIONS
from streams.errors import ConfigError
from streams.ports import ItemFilter
from streams.records import Limits
from streams.rerank import RerankPolicy

ENV_PREFIX = "RTREC_"
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class Secret:
    """A string that never shows itself in logs, reprs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    # Where local state lives: the local broker, embedded Qdrant, models, Faust data.
    home: Path = Path(".rtrec")
    # Kafka. Empty means the local broker that `rtrec broker start` / `rtrec demo` runs.
    kafka_bootstrap: str = ""
    local_kafka_port: int = 19092
    # Kafka security for every client (worker, producers, readers, admin): PLAINTEXT, SSL,
    # SASL_PLAINTEXT or SASL_SSL; SASL with PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: Secret | None = None
    # CA bundle that signed the brokers' certificates (empty: the system's CAs).
    kafka_ssl_cafile: str = ""
    topic_partitions: int = 4
    topic_replication: int = 1
    events_topic: str = "rec.events"
    items_topic: str = "rec.items"
    recommendations_topic: str = "rec.recommendations"
    deadletter_topic: str = "rec.deadletter"
    control_topic: str = "rec.control"
    events_retention_hours: int = 24 * 7
    app_id: str = "rtrec"
    # Keyed hash of user ids in state and the vector store (empty: ids kept as given); see streams.pseudonym.
    pseudonymize_key: Secret | None = None
    # How long a worker that died without leaving (SIGKILL, lost host) keeps its partitions before
    # the group hands them to the others: the longest pause a crash causes.
    kafka_session_timeout_s: float = 10.0
    # Faust table store: memory:// (state rebuilt from the changelog at start) or rocksdb://.
    table_store: str = "memory://"
    # rocksdb:// only: memory RocksDB may use per table partition (block cache and write buffers); the rest
    # stays on disk. Faust's own defaults allow over 2 GB per partition.
    table_cache_mb: int = 64
    # Qdrant. Empty URL means embedded local mode in `qdrant_path` (default: <home>/qdrant).
    qdrant_url: str = ""
    qdrant_api_key: Secret | None = None
    # CA bundle that signed an https Qdrant server's certificate (empty: the system's CAs).
    qdrant_ca_cert: str = ""
    qdrant_path: str = ""
    items_collection: str = "items"
    # HNSW candidates per search (0: Qdrant's default); lower is faster, check recall with `rtrec bench`.
    search_ef: int = 0
    users_collection: str = "users"
    # Models. Empty dir means <home>/models.
    model_dir: str = ""
    # How often a worker looks for a new bundle in the model folder and swaps it in live (0: never).
    model_reload_s: float = 30.0
    encoder_provider: str = "auto"
    # auto: the bundle's float16 user tower on CUDA when it has one, else float32; int8 only when asked.
    encoder_precision: str = "auto"
    # ONNX Runtime threads per encoder call (0: one per core; 1 when running one worker per core).
    encoder_threads: int = 0
    # The user window and the recommendation list.
    window_size: int = 50
    window_horizon_s: int = 30 * 24 * 3600
    dedup_capacity: int = 500
    top_k: int = 10
    # Re-ranking (streams.rerank): MMR diversity in [0, 1), freshness half-life of catalogue age
    # (0: off), and how many candidates to re-rank when either is on.
    rerank_diversity: float = 0.0
    rerank_freshness_half_life_h: float = 0.0
    rerank_candidates: int = 50
    # Feedback: relevance lost per unit of similarity to a disliked, skipped or returned item; and hiding candidates at
    # least this similar (cosine) to an item the user bought (0: off).
    rerank_dislike_penalty: float = 0.5
    rerank_bought_duplicate_similarity: float = 0.0
    # Trending (the cold-start list): an event's weight halves every this many seconds of event time.
    trending_half_life_s: float = 3600.0
    # Business rules every list obeys: comma-separated categories to keep (empty: all) and to leave out.
    allow_categories: str = ""
    deny_categories: str = ""
    # Item vectors cached in the worker (LRU), and how long another worker's catalogue change may go unseen.
    item_cache_size: int = 200_000
    item_cache_ttl_s: float = 300.0
    # Windows kept decoded in the worker (LRU): a hit saves decoding one (~90 µs); a full window with its
    # remembered event ids takes ~90 KB decoded (~11 KB stored).
    window_cache_size: int = 10_000
    # Micro-batching at the stream boundary.
    batch_max: int = 256
    batch_within_s: float = 0.05
    # Input limits: anything beyond goes to the dead-letter topic.
    max_message_bytes: int = 1_000_000
    max_id_chars: int = 256
    max_text_chars: int = 20_000
    max_future_skew_s: int = 24 * 3600
    log_level: str = "info"
    # Prometheus /metrics of the worker on this port (0: off; one port per worker process).
    metrics_port: int = 0
    # The worker's HTTP API on this port (0: off; one port per worker process), and the host name
    # other workers reach it by (a request for a user another worker serves is forwarded there).
    http_port: int = 0
    http_host: str = "127.0.0.1"
    # Most items one HTTP request may ask for.
    max_http_k: int = 100

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in environ:
                values[f.name] = _parse(name, environ[name], hints[f.name])
        unknown = sorted(
            k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() not in _FIELD_NAMES
        )
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (see `rtrec config`)")
        return cls(**values).validated()

    def with_overrides(self, **overrides: Any) -> Settings:
        """Apply CLI flags; ``None`` means the flag was not given."""
        given = {k: v for k, v in overrides.items() if v is not None}
        hints = get_type_hints(type(self))
        for name, value in list(given.items()):
            if name not in _FIELD_NAMES:
                raise ConfigError(f"unknown setting '{name}'")
            if isinstance(value, str) and hints[name] is not str:
                given[name] = _parse(name, value, hints[name])
        return dataclasses.replace(self, **given).validated()

    def isolated(self, run: str) -> Settings:
        """Topics, collections and a consumer group of the run's own: it meets no state of earlier runs."""
        return self.with_overrides(
            app_id=f"rtrec-{run}",
            events_topic=f"{run}.events",
            items_topic=f"{run}.items",
            recommendations_topic=f"{run}.recommendations",
            deadletter_topic=f"{run}.deadletter",
            control_topic=f"{run}.control",
            items_collection=f"{run}-items",
            users_collection=f"{run}-users",
        )

    def validated(self) -> Settings:
        positive = (
            "topic_partitions",
            "topic_replication",
            "window_size",
            "top_k",
            "batch_max",
            "dedup_capacity",
            "item_cache_size",
            "table_cache_mb",
            "max_http_k",
            "rerank_candidates",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rerank_diversity < 1:
            raise ConfigError(f"{ENV_PREFIX}RERANK_DIVERSITY must be in [0, 1), got {self.rerank_diversity}")
        if self.trending_half_life_s <= 0:
            raise ConfigError(f"{ENV_PREFIX}TRENDING_HALF_LIFE_S must be > 0, got {self.trending_half_life_s}")
        if self.rerank_dislike_penalty < 0:
            raise ConfigError(f"{ENV_PREFIX}RERANK_DISLIKE_PENALTY must be >= 0, got {self.rerank_dislike_penalty}")
        if not 0 <= self.rerank_bought_duplicate_similarity <= 1:
            raise ConfigError(
                f"{ENV_PREFIX}RERANK_BOUGHT_DUPLICATE_SIMILARITY must be in [0, 1], "
                f"got {self.rerank_bought_duplicate_similarity}"
            )
        if self.rerank_freshness_half_life_h < 0:
            raise ConfigError(
                f"{ENV_PREFIX}RERANK_FRESHNESS_HALF_LIFE_H must be >= 0, got {self.rerank_freshness_half_life_h}"
            )
        if self.search_ef < 0:
            raise ConfigError(f"{ENV_PREFIX}SEARCH_EF must be >= 0, got {self.search_ef}")
        if self.model_reload_s < 0:
            raise ConfigError(f"{ENV_PREFIX}MODEL_RELOAD_S must be >= 0 (0: never), got {self.model_reload_s}")
        if self.encoder_threads < 0:
            raise ConfigError(f"{ENV_PREFIX}ENCODER_THREADS must be >= 0, got {self.encoder_threads}")
        for name in ("metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be a TCP port (0: off), got {getattr(self, name)}")
        if self.window_horizon_s <= 0:
            raise ConfigError(f"{ENV_PREFIX}WINDOW_HORIZON_S must be > 0, got {self.window_horizon_s}")
        if self.window_cache_size < 0:
            raise ConfigError(f"{ENV_PREFIX}WINDOW_CACHE_SIZE must be >= 0, got {self.window_cache_size}")
        if self.item_cache_ttl_s < 0:
            raise ConfigError(f"{ENV_PREFIX}ITEM_CACHE_TTL_S must be >= 0, got {self.item_cache_ttl_s}")
        if not 6 <= self.kafka_session_timeout_s <= 300:
            raise ConfigError(
                f"{ENV_PREFIX}KAFKA_SESSION_TIMEOUT_S must be within the broker's default bounds, 6 to 300 s, "
                f"got {self.kafka_session_timeout_s}"
            )
        if self.kafka_security_protocol not in KAFKA_PROTOCOLS:
            raise ConfigError(
                f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_PROTOCOLS)}, "
                f"got {self.kafka_security_protocol!r}"
            )
        if self.kafka_security_protocol.startswith("SASL"):
            if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(
                    f"{ENV_PREFIX}KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                    f"got {self.kafka_sasl_mechanism!r}"
                )
            if not self.kafka_sasl_username or self.kafka_sasl_password is None:
                raise ConfigError(
                    f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                    f"{ENV_PREFIX}KAFKA_SASL_USERNAME and {ENV_PREFIX}KAFKA_SASL_PASSWORD"
                )
        for name in ("kafka_ssl_cafile", "qdrant_ca_cert"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"{ENV_PREFIX}{name.upper()}: no such file {getattr(self, name)!r}")
        if self.batch_within_s <= 0:
            raise ConfigError(f"{ENV_PREFIX}BATCH_WITHIN_S must be > 0, got {self.batch_within_s}")
        if self.encoder_precision not in PRECISIONS:
            raise ConfigError(
                f"{ENV_PREFIX}ENCODER_PRECISION must be one of {', '.join(PRECISIONS)}, got {self.encoder_precision!r}"
            )
        if self.encoder_provider not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{ENV_PREFIX}ENCODER_PROVIDER must be auto, cpu or cuda, got {self.encoder_provider!r}")
        if not self.table_store.startswith(("memory://", "rocksdb://")):
            raise ConfigError(f"{ENV_PREFIX}TABLE_STORE must be memory:// or rocksdb://, got {self.table_store!r}")
        return self

    def limits(self) -> Limits:
        """The input limits every decoder applies (the worker's and the publishing helpers')."""
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_id_chars=self.max_id_chars,
            max_text_chars=self.max_text_chars,
            max_future_skew_s=self.max_future_skew_s,
        )

    def rerank_policy(self) -> RerankPolicy:
        return RerankPolicy(
            diversity=self.rerank_diversity,
            freshness_half_life_s=self.rerank_freshness_half_life_h * 3600,
            candidates=self.rerank_candidates,
            dislike_penalty=self.rerank_dislike_penalty,
            bought_duplicate_similarity=self.rerank_bought_duplicate_similarity,
        )

    def business_rules(self) -> ItemFilter | None:
        allowed, denied = _names(self.allow_categories), _names(self.deny_categories)
        return ItemFilter(categories=allowed, exclude_categories=denied) if allowed or denied else None

    def kafka_options(self) -> dict[str, Any]:
        """Connection options for every kafka-python client (producers, consumers, admin)."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_password is not None  # validated
            options |= {
                "sasl_mechanism": self.kafka_sasl_mechanism,
                "sasl_plain_username": self.kafka_sasl_username,
                "sasl_plain_password": self.kafka_sasl_password.reveal(),
            }
        if self.kafka_security_protocol.endswith("SSL") and self.kafka_ssl_cafile:
            options["ssl_cafile"] = self.kafka_ssl_cafile
        return options

    def kafka_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a client that speaks SSL or SASL_SSL (None for a plaintext protocol)."""
        if not self.kafka_security_protocol.endswith("SSL"):
            return None
        return ssl.create_default_context(cafile=self.kafka_ssl_cafile or None)

    # Derived locations: one place decides where each piece of local state lives.
    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.local_kafka_port}"

    @property
    def uses_local_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def models_path(self) -> Path:
        return Path(self.model_dir) if self.model_dir else self.home / "models"

    @property
    def qdrant_local_path(self) -> Path:
        return Path(self.qdrant_path) if self.qdrant_path else self.home / "qdrant"

    @property
    def kafka_data_path(self) -> Path:
        return self.home / "kafka"

    @property
    def faust_data_path(self) -> Path:
        return self.home / "faust"

    def secrets(self) -> dict[str, str]:
        """The secret settings in the clear, as environment variables (for a child worker only)."""
        return {
            ENV_PREFIX + f.name.upper(): value.reveal()
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Secret)
        }

    def describe(self) -> dict[str, str]:
        """The effective configuration with secrets masked, for `rtrec config`."""
        shown: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown[ENV_PREFIX + f.name.upper()] = "" if value is None else str(value)
        return shown


def _names(listed: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in listed.split(",") if name.strip())


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))


def _parse(name: str, raw: str, kind: Any) -> Any:
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is Path:
            return Path(text)
        if kind == (Secret | None):
            return Secret(text) if text else None
        return text
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot parse {raw!r} ({exc})") from None
