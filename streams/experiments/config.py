"""An experiment as an operator declares it: a TOML file named by ``RTREC_EXPERIMENTS``.

    name = "encoder-vs-popular"      # letters, digits, ".", "_" and "-"
    salt = "2026-12"                 # optional (default: the name): a new salt reshuffles the users
    attribution_window_s = 1800      # optional: how long after a list a click on one of its items counts
    report_bucket_s = 3600           # optional: the time step of the report's curves (event time)
    interleave = false               # optional: team-draft interleave the two variants into every list

    [[variant]]                      # the first variant is the control
    name = "control"
    share = 50                       # a share of traffic (any non-negative numbers; 0 drains the variant)

    [[variant]]
    name = "popular"
    share = 50
    baseline = "trending"            # the popularity list instead of a model

    [[variant]]
    name = "diverse"
    share = 0
    model = "/models/candidate"      # a folder holding an interest-encoder bundle (default: the served model)
    rerank = { diversity = 0.3 }     # re-ranking settings, as RTREC_RERANK_* without the prefix

Everything is checked when the file is read, each problem in one line naming the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encoder.config import INTEREST_BUNDLE
from streams.errors import ConfigError
from streams.rerank import RerankPolicy
from streams.settings import Settings

BASELINES = ("trending",)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RERANK_SETTINGS = ("diversity", "freshness_half_life_h", "candidates", "dislike_penalty", "bought_duplicate_similarity")
EXPERIMENT_KEYS = {"name", "salt", "attribution_window_s", "report_bucket_s", "interleave", "variant"}
VARIANT_KEYS = {"name", "share", "baseline", "model", "rerank"}


@dataclass(frozen=True)
class VariantConfig:
    """One serving configuration under test."""

    name: str
    share: float
    baseline: str | None = None  # "trending": the popularity list; None: an interest encoder
    model_dir: Path | None = None  # the folder of its interest-encoder bundle; None: the served model
    rerank: dict[str, float] = field(default_factory=dict)  # overrides of the worker's RTREC_RERANK_* settings

    def policy(self, settings: Settings) -> RerankPolicy:
        """The worker's re-ranking settings with this variant's overrides, bounded like the settings themselves."""
        return settings.with_overrides(**{f"rerank_{k}": v for k, v in self.rerank.items()}).rerank_policy()


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    variants: tuple[VariantConfig, ...]
    salt: str = ""
    attribution_window_s: float = 1800.0
    report_bucket_s: float = 3600.0
    interleave: bool = False

    @property
    def control(self) -> VariantConfig:
        return self.variants[0]

    @property
    def assignment_salt(self) -> str:
        return self.salt or self.name


def load_experiment(path: Path, settings: Settings) -> ExperimentConfig:
    """The experiment declared in ``path``, checked (``ConfigError`` names the first problem)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"experiment file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"experiment file {path} is not valid TOML: {exc}") from None
    try:
        return parse_experiment(raw, settings)
    except ConfigError as exc:
        raise ConfigError(f"experiment file {path}: {exc}") from None


def parse_experiment(raw: dict[str, Any], settings: Settings) -> ExperimentConfig:
    _no_unknown(raw, EXPERIMENT_KEYS, "the experiment")
    name = _name(raw.get("name"), "name")
    variants = raw.get("variant")
    if not isinstance(variants, list) or len(variants) < 2:
        raise ConfigError("an experiment needs at least two [[variant]] tables (the first is the control)")
    parsed = tuple(_variant(v, n, settings) for n, v in enumerate(variants))
    names = [v.name for v in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must differ, got {names}")
    interleave = raw.get("interleave", False)
    if not isinstance(interleave, bool):
        raise ConfigError(f"interleave must be true or false, got {interleave!r}")
    if interleave and len(parsed) != 2:
        raise ConfigError(f"interleave takes exactly two variants, got {len(parsed)}")
    if not interleave and sum(v.share for v in parsed) <= 0:
        raise ConfigError("at least one variant needs a share above 0")
    salt = raw.get("salt", "")
    if not isinstance(salt, str):
        raise ConfigError(f"salt must be a string, got {salt!r}")
    return ExperimentConfig(
        name=name,
        variants=parsed,
        salt=salt,
        attribution_window_s=_positive(raw, "attribution_window_s", 1800.0),
        report_bucket_s=_positive(raw, "report_bucket_s", 3600.0),
        interleave=interleave,
    )


def _variant(raw: object, index: int, settings: Settings) -> VariantConfig:
    where = f"variant {index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    _no_unknown(raw, VARIANT_KEYS, where)
    name = _name(raw.get("name"), f"{where}: name")
    share = raw.get("share", 1.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or share < 0:
        raise ConfigError(f"variant {name!r}: share must be a number >= 0, got {share!r}")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in BASELINES:
        raise ConfigError(f"variant {name!r}: baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    model = raw.get("model")
    if baseline is not None and (model is not None or "rerank" in raw):
        raise ConfigError(f"variant {name!r}: a baseline takes no model and no rerank settings")
    model_dir = None
    if model is not None:
        model_dir = Path(str(model))
        if not (model_dir / INTEREST_BUNDLE).is_dir():
            raise ConfigError(f"variant {name!r}: model {model_dir} holds no {INTEREST_BUNDLE}/ bundle")
    rerank = raw.get("rerank", {})
    if not isinstance(rerank, dict):
        raise ConfigError(f"variant {name!r}: rerank must be a table, e.g. rerank = {{ diversity = 0.3 }}")
    unknown = sorted(set(rerank) - set(RERANK_SETTINGS))
    if unknown:
        raise ConfigError(
            f"variant {name!r}: unknown rerank setting {unknown[0]!r} (known: {', '.join(RERANK_SETTINGS)})"
        )
    variant = VariantConfig(name, float(share), baseline, model_dir, dict(rerank))
    try:
        variant.policy(settings)
    except ConfigError as exc:
        raise ConfigError(f"variant {name!r}: rerank {exc}") from None
    return variant


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(f"{what} must be 1 to 64 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _positive(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _no_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
