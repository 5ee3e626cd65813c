"""The one settings object, read from ``RTREC_*`` environment variables once at start.

Each field carries its description and bounds (``setting``): validation is one loop over them,
and docs/configuration.md is generated from them (``rtrec config --markdown``; a test keeps the
page in step). CLI flags override environment values through ``Settings.with_overrides``.
Nothing reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
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
BATCH_QUIET_S = 0.002  # a micro-batch is taken once no event has joined it for this long (before batch_within_s)


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
class SettingSpec:
    """What a setting means and which values it takes: the one place each is described and bounded.

    ``rtrec config``, the validation, the CLI's flags and docs/configuration.md all read it.
    """

    help: str
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    port: bool = False  # a TCP port, 0 meaning off
    file: bool = False  # a path that must name an existing file when given
    shown: str = ""  # the default as the docs show it, where the value itself says less (a derived path)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, completing "RTREC_X must ..."; None when it is."""
        if self.port and not 0 <= value <= 65535:
            return f"be a TCP port (0: off), got {value}"
        interval = _interval(self)
        if interval and not _within(self, value):
            return f"be {interval}, got {value}"
        if self.choices and value not in self.choices:
            return f"be one of {', '.join(self.choices)}, got {value!r}"
        if self.prefixes and not str(value).startswith(self.prefixes):
            return f"be {' or '.join(self.prefixes)}, got {value!r}"
        return None


def _within(spec: SettingSpec, value: float) -> bool:
    return (
        (spec.at_least is None or value >= spec.at_least)
        and (spec.above is None or value > spec.above)
        and (spec.at_most is None or value <= spec.at_most)
        and (spec.below is None or value < spec.below)
    )


def _interval(spec: SettingSpec) -> str:
    """The bounds in words: ">= 1", "> 0", "in [0, 1)", "in [6, 300]"."""
    low = (f"[{spec.at_least:g}" if spec.at_least is not None else None) or (
        f"({spec.above:g}" if spec.above is not None else None
    )
    high = (f"{spec.at_most:g}]" if spec.at_most is not None else None) or (
        f"{spec.below:g})" if spec.below is not None else None
    )
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    if high:
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]
    return ""


def setting(default: Any, help: str, **bounds: Any) -> Any:
    """A ``Settings`` field with its description and bounds (``SettingSpec``)."""
    return field(default=default, metadata={"spec": SettingSpec(help, **bounds)})


def spec_of(f: dataclasses.Field[Any]) -> SettingSpec:
    spec = f.metadata["spec"]
    assert isinstance(spec, SettingSpec)
    return spec


@dataclass(frozen=True)
class Settings:
    """Every setting, each described and bounded where it is declared (``setting``)."""

    home: Path = setting(Path(".rtrec"), "folder for local state: broker data, embedded Qdrant, models, Faust data")
    kafka_bootstrap: str = setting("", "Kafka bootstrap servers (`host:port,…`); empty means the local broker")
    local_kafka_port: int = setting(19092, "port of the local broker (its controller uses the next one)")
    kafka_security_protocol: str = setting(
        "PLAINTEXT",
        "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`, for every client: the worker, producers, "
        "readers, the admin client",
        choices=KAFKA_PROTOCOLS,
    )
    kafka_sasl_mechanism: str = setting(
        "PLAIN",
        "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with a `SASL_*` protocol)",
        choices=SASL_MECHANISMS,
    )
    kafka_sasl_username: str = setting("", "SASL user (required with a `SASL_*` protocol)")
    kafka_sasl_password: Secret | None = setting(
        None,
        "SASL password (never printed: `rtrec config` masks it, errors and logs leave it out)",
    )
    kafka_ssl_cafile: str = setting(
        "",
        "CA bundle that signed the brokers' certificates (empty: the system's CAs)",
        file=True,
    )
    topic_partitions: int = setting(4, "partitions of every topic (and of the window table's changelog)", at_least=1)
    topic_replication: int = setting(1, "replication factor of the topics", at_least=1)
    topic_min_insync_replicas: int = setting(
        1,
        "`min.insync.replicas` of the topics `rtrec topics` creates: every producer of the pipeline waits for "
        "all in-sync replicas (acks=all), so a write is acknowledged only once this many brokers hold it "
        "(2 with replication 3 survives the loss of a broker; at most the replication)",
        at_least=1,
    )
    events_topic: str = setting("rec.events", "input events")
    items_topic: str = setting("rec.items", "catalogue changes")
    recommendations_topic: str = setting("rec.recommendations", "output")
    deadletter_topic: str = setting("rec.deadletter", "invalid input, with reasons")
    control_topic: str = setting("rec.control", "control commands")
    events_retention_hours: int = setting(24 * 7, "retention of the events topic")
    app_id: str = setting("rtrec", "Faust app id = consumer group; workers with the same id share the partitions")
    pseudonymize_key: Secret | None = setting(
        None,
        "with a key, the window table and the users collection hold a keyed hash (HMAC-SHA-256) of each user "
        "id instead of the id (input and output topics keep real ids); changing it orphans existing state",
    )
    kafka_session_timeout_s: float = setting(
        10.0,
        "how long a worker that died without leaving (SIGKILL, lost host) keeps its partitions before the "
        "group hands them on: the longest pause a crash causes (6 to 300)",
        at_least=6,
        at_most=300,
    )
    table_store: str = setting(
        "memory://",
        "Faust table store: `memory://` rebuilds windows from the changelog at start; `rocksdb://` keeps them"
        " on disk under `<home>/faust` (RocksDB through `rocksdict`) and reads only the changelog written "
        "since",
        prefixes=("memory://", "rocksdb://"),
    )
    table_cache_mb: int = setting(
        64,
        "`rocksdb://` only: memory RocksDB may use per table partition (three quarters block cache, the rest "
        "write buffers); Faust's own defaults allow over 2 GB per partition",
        at_least=1,
    )
    qdrant_url: str = setting(
        "",
        "Qdrant server URL; empty means embedded Qdrant (Qdrant Edge, in-process) in `RTREC_QDRANT_PATH`",
    )
    qdrant_api_key: Secret | None = setting(None, "API key for the Qdrant server (never printed)")
    qdrant_ca_cert: str = setting(
        "",
        "CA bundle that signed an `https://` Qdrant server's certificate (empty: the system's CAs)",
        file=True,
    )
    qdrant_grpc_port: int = setting(
        0,
        "the Qdrant server's gRPC port: when set, every call goes over gRPC instead of REST (BENCHMARKS.md has "
        "the two side by side); 0: REST on the URL's port",
        at_least=0,
        at_most=65535,
    )
    qdrant_shards: int = setting(
        1, "shards of each collection created on a Qdrant server (a cluster spreads them over its nodes)", at_least=1
    )
    qdrant_replication_factor: int = setting(
        1, "copies of each shard on a Qdrant cluster: 2 or more survives the loss of a node", at_least=1
    )
    qdrant_write_consistency_factor: int = setting(
        1,
        "copies of a shard that must confirm a write before Qdrant acknowledges it (at most the replication "
        "factor; 1 keeps writing while a copy's node is down)",
        at_least=1,
    )
    qdrant_binary: str = setting(
        "",
        "the Qdrant server binary `rtrec qdrant start` and the tests run (empty: `qdrant` on the PATH, else "
        "`../shared/bin/qdrant` beside the checkout)",
        file=True,
    )
    local_qdrant_port: int = setting(
        16333,
        "HTTP port of the local Qdrant server `rtrec qdrant start` runs (gRPC on the next one)",
        at_least=1,
        at_most=65535,
    )
    qdrant_path: str = setting("", "folder of the embedded Qdrant", shown="<home>/qdrant")
    items_collection: str = setting(
        "items",
        "Qdrant collection of item vectors; each item tower gets its own, `<this>-<tower id>` (the tower id "
        "names the model's item space)",
    )
    search_ef: int = setting(
        0,
        "HNSW candidates per search (0: Qdrant's default); lower is faster, `rtrec bench` reports the recall it costs",
        at_least=0,
    )
    native_search_from: int = setting(
        0,
        "with embedded Qdrant, a searched collection of at least this many points (e.g. 10000) is searched "
        "through an in-process HNSW index mirroring it (usearch; built in the background when a worker opens "
        "it; BENCHMARKS.md has what it changes); 0: Qdrant searches everything",
        at_least=0,
    )
    users_collection: str = setting("users", "Qdrant collection of user vectors")
    model_dir: str = setting("", "where the model bundles live", shown="<home>/models")
    model_reload_s: float = setting(
        30.0,
        "how often a worker looks for a new interest-encoder bundle in `RTREC_MODEL_DIR` and swaps it in "
        "without stopping (0: never)",
        at_least=0,
    )
    encoder_provider: str = setting(
        "auto",
        "`auto` (CUDA when a GPU driver is present), `cpu` or `cuda` (fails if CUDA cannot start)",
        choices=("auto", "cpu", "cuda"),
    )
    encoder_precision: str = setting(
        "auto",
        "user tower precision: `auto` (the bundle's float16 tower on CUDA when it has one, else float32), "
        "`fp32`, `fp16`, `int8` (a bundle exported with `--int8`)",
        choices=PRECISIONS,
    )
    encoder_threads: int = setting(
        1,
        "ONNX Runtime threads per encoder call (0: one per core). The stream's calls are small: on 2 idle "
        "cores one thread was faster than two at every batch size measured",
        at_least=0,
    )
    window_size: int = setting(50, "events kept per user", at_least=1)
    window_horizon_s: int = setting(
        30 * 24 * 3600,
        "events older than this (event time, from the user's newest event) leave the window",
        above=0,
    )
    dedup_capacity: int = setting(500, "recent event ids remembered per user for deduplication", at_least=1)
    top_k: int = setting(10, "items per recommendation", at_least=1)
    rerank_diversity: float = setting(
        0.0,
        "MMR trade-off in [0, 1): 0 ranks by relevance alone; higher values make each pick avoid items "
        "similar to those already picked",
        at_least=0,
        below=1,
    )
    rerank_freshness_half_life_h: float = setting(
        0.0,
        "relevance halves for every this many hours of an item's catalogue age (0: off)",
        at_least=0,
    )
    rerank_candidates: int = setting(
        50,
        "candidates fetched and re-ranked when diversity or freshness is on",
        at_least=1,
    )
    rerank_dislike_penalty: float = setting(
        0.5,
        "relevance (rescaled to [0, 1]) a candidate loses per unit of cosine similarity to an item the user "
        "disliked, skipped or returned (0: off)",
        at_least=0,
    )
    rerank_bought_duplicate_similarity: float = setting(
        0.0,
        "leave out candidates at least this similar (cosine) to an item the user bought: near-duplicates of a"
        " purchase (0: off)",
        at_least=0,
        at_most=1,
    )
    trending_half_life_s: float = setting(
        3600.0,
        "the cold-start list (`GET /trending`): an event's weight halves every this many seconds of event time",
        above=0,
    )
    cooccurrence: str = setting(
        "auto",
        "count which items users reach one after another, per events partition (kept in a changelogged table), "
        "and fuse it into the lists as the model's bundle says (chosen on validation targets by `rtrec train`; "
        "docs/models.md). auto: only where the served model fuses it; on: always (GET /items/{id}/together "
        "answers, and a model swapped in later finds counts); off: never, the encoder alone",
        choices=("auto", "on", "off"),
    )
    allow_categories: str = setting(
        "",
        "comma-separated categories every list keeps to (empty: all); an HTTP request can only narrow it",
    )
    deny_categories: str = setting("", "comma-separated categories never recommended")
    item_cache_size: int = setting(
        200_000,
        "item vectors cached in each worker (least recently used leave first)",
        at_least=1,
    )
    item_cache_ttl_s: float = setting(
        300.0,
        "a cached item vector is re-read after this long (how long another worker's catalogue change can go "
        "unseen; 0: never cache)",
        at_least=0,
    )
    window_cache_size: int = setting(
        10_000,
        "user windows kept decoded in each worker (least recently used leave first; 0: none): a hit saves "
        "decoding one (~90 µs), and a full window takes ~90 KB decoded, so this bounds that memory (~0.9 GB)",
        at_least=0,
    )
    batch_max: int = setting(256, "largest micro-batch taken from the stream", at_least=1)
    batch_within_s: float = setting(
        0.05,
        "longest a micro-batch waits to fill after its first event "
        f"(taken sooner once {BATCH_QUIET_S * 1000:g} ms pass with no new event)",
        above=0,
    )
    max_message_bytes: int = setting(1_000_000, "larger messages are dead-lettered")
    max_id_chars: int = setting(256, "longer ids are dead-lettered")
    max_text_chars: int = setting(20_000, "longer item text is dead-lettered")
    max_future_skew_s: int = setting(24 * 3600, "events stamped further in the future are dead-lettered")
    log_level: str = setting("info", "worker log level")
    metrics_port: int = setting(
        0,
        "Prometheus `/metrics` of the worker on this port (0: off; one port per worker process)",
        port=True,
    )
    http_port: int = setting(0, "the worker's HTTP API on this port (0: off; one port per worker process)", port=True)
    http_host: str = setting(
        "127.0.0.1",
        "the host name other workers reach this worker's HTTP API by, and the address it listens on (requests "
        "for users another worker serves are forwarded there); the default keeps the API and the console on this "
        "machine; empty: this machine's host name, listening on every interface, as in containers",
    )
    max_http_k: int = setting(100, "most items one HTTP request may ask for", at_least=1)
    experiments: str = setting(
        "",
        "a TOML file declaring the experiment the workers run (docs/experiments.md); re-read when it changes, "
        "checked every RTREC_MODEL_RELOAD_S (empty: no experiment)",
        file=True,
    )
    console: bool = setting(
        False,
        "serve the live console at `/console` on the HTTP API's port (needs RTREC_HTTP_PORT). It shows user "
        "ids and what they did: keep the port on the operator's network",
    )

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
        for f in dataclasses.fields(self):
            spec, value = spec_of(f), getattr(self, f.name)
            if (problem := spec.problem(value)) is not None:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()} must {problem}")
            if spec.file and value and not Path(value).is_file():
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: no such file {value!r}")
        for smaller, larger in (
            ("topic_min_insync_replicas", "topic_replication"),
            ("qdrant_write_consistency_factor", "qdrant_replication_factor"),
        ):
            if getattr(self, smaller) > getattr(self, larger):
                raise ConfigError(
                    f"{ENV_PREFIX}{smaller.upper()} ({getattr(self, smaller)}) must be at most "
                    f"{ENV_PREFIX}{larger.upper()} ({getattr(self, larger)})"
                )
        if self.console and not self.http_port:
            raise ConfigError(f"{ENV_PREFIX}CONSOLE=1 needs {ENV_PREFIX}HTTP_PORT: the console is served on it")
        if self.kafka_security_protocol.startswith("SASL") and (
            not self.kafka_sasl_username or self.kafka_sasl_password is None
        ):
            raise ConfigError(
                f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                f"{ENV_PREFIX}KAFKA_SASL_USERNAME and {ENV_PREFIX}KAFKA_SASL_PASSWORD"
            )
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
        """The re-ranking preferences, bounded by these settings' own bounds."""
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
    def qdrant_server_path(self) -> Path:
        return self.home / "qdrant-server"

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


def reference_table() -> str:
    """Every setting as a Markdown table (variable, default, meaning), as docs/configuration.md shows it."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        spec = spec_of(f)
        shown = spec.shown or ("" if f.default in ("", None) else str(f.default))
        default = f"`{shown}`" if shown else "*(empty)*"
        lines.append(f"| `{ENV_PREFIX}{f.name.upper()}` | {default} | {spec.help} |")
    return "\n".join(lines) + "\n"


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
