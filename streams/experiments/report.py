"""`rtrec experiment report`: an experiment's counts read from the broker, analysed per variant.

The workers keep the counts in a changelogged table, one record per events partition and report
bucket (``streams.experiments.attribution``); its changelog topic holds the latest of each. The report
reads that topic, adds up the partitions, accumulates the buckets in event-time order, and for the
whole run and for every bucket's end computes each variant's metrics with 95% intervals and their
difference against the control with a p-value; an interleaved experiment, the users' preferences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streams.clients.kafka_io import end_offsets, read_until
from streams.errors import InvalidRecord, RtrecError
from streams.experiments.attribution import N_STATS, PREFERENCES, TOTALS, ExperimentCounts
from streams.experiments.stats import METRICS, compare, preference, ratio
from streams.settings import Settings
from streams.worker.tables import experiment_counts_changelog_topic


@dataclass
class Timeline:
    """One experiment's counts summed over partitions, per report bucket (event time, oldest first)."""

    experiment: str
    buckets: dict[int, ExperimentCounts] = field(default_factory=dict)

    def add(self, counts: ExperimentCounts) -> None:
        held = self.buckets.setdefault(
            counts.bucket_start_ms, ExperimentCounts(self.experiment, counts.bucket_start_ms)
        )
        for name, stats in counts.variants.items():
            held.variants[name] = held.variants.get(name, np.zeros(N_STATS)) + stats
        held.preferences = held.preferences + counts.preferences

    def cumulative(self) -> list[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """(bucket end, each variant's statistics so far, the preferences so far), oldest first."""
        so_far: dict[str, np.ndarray] = {}
        preferences = np.zeros(len(PREFERENCES))
        steps = []
        for start in sorted(self.buckets):
            counts = self.buckets[start]
            for name, stats in counts.variants.items():
                so_far[name] = so_far.get(name, np.zeros(N_STATS)) + stats
            preferences = preferences + counts.preferences
            steps.append((start, {n: s.copy() for n, s in so_far.items()}, preferences.copy()))
        return steps


def read_timelines(settings: Settings, timeout_s: float = 120.0) -> dict[str, Timeline]:
    """Every experiment's counts in the workers' counts changelog (the newest record of each key)."""
    topic = experiment_counts_changelog_topic(settings)
    newest: dict[bytes, bytes | None] = {}
    for records in read_until(settings, topic, end_offsets(settings, topic), timeout_s):
        for record in records:
            if record.key is not None:
                newest[record.key] = record.value
    timelines: dict[str, Timeline] = {}
    for key, value in newest.items():
        if value is None:
            continue
        try:
            counts = ExperimentCounts.from_bytes(value)
        except InvalidRecord as exc:
            raise RtrecError(f"experiment counts {key!r} in {topic} are unreadable: {exc.reason}") from None
        timelines.setdefault(counts.experiment, Timeline(counts.experiment)).add(counts)
    return timelines


def analyse(variants: Mapping[str, np.ndarray], preferences: np.ndarray, order: list[str]) -> dict[str, Any]:
    """Per variant: users and totals, each metric with its interval, and its comparison with the control
    (the first of ``order``); the preferences when the experiment interleaves."""
    control = order[0]
    report: dict[str, Any] = {"control": control, "variants": {}}
    for name in order:
        stats = variants.get(name, np.zeros(N_STATS))
        entry: dict[str, Any] = {"users": round(float(stats[0]))}
        entry |= {total: _number(stats[1 + i]) for i, total in enumerate(TOTALS) if total != "reciprocal_ranks"}
        for metric, numerator, denominator, _ in METRICS:
            value = ratio(stats, numerator, denominator)
            low, high = value.interval
            entry[metric] = {"value": _number(value.value), "ci95": [_number(low), _number(high)]}
            if name != control:
                versus = compare(ratio(variants.get(control, np.zeros(N_STATS)), numerator, denominator), value)
                entry[metric]["vs_control"] = {
                    "difference": _number(versus.difference),
                    "ci95": [_number(versus.interval[0]), _number(versus.interval[1])],
                    "relative": _number(versus.relative),
                    "p_value": _p_value(versus.p_value),
                    "sequential_p": _p_value(versus.sequential_p),
                }
        report["variants"][name] = entry
    if preferences.any():
        chosen = preference(preferences)
        report["interleaving"] = {
            "prefer_first": chosen.first,
            "prefer_second": chosen.second,
            "tied": chosen.tied,
            "first_share": _number(chosen.first_share),
            "p_value": _p_value(chosen.p_value),
            "sequential_p": _p_value(chosen.sequential_p),
        }
    return report


def pick_timeline(timelines: Mapping[str, Timeline], name: str | None) -> Timeline:
    """The named experiment's counts, or the only experiment's."""
    if not timelines:
        raise RtrecError("no experiment counts under this app id: has an experiment run?")
    if name is None:
        if len(timelines) > 1:
            raise RtrecError(f"several experiments have counts ({', '.join(sorted(timelines))}): name one with --name")
        return next(iter(timelines.values()))
    if name not in timelines:
        raise RtrecError(f"no counts of experiment {name!r}; there are: {', '.join(sorted(timelines))}")
    return timelines[name]


def experiment_report(timeline: Timeline, order: list[str] | None = None, control: str | None = None) -> dict[str, Any]:
    """The whole run's analysis, and the same at the end of every bucket (for the plots). The control is
    ``control``, else the first of ``order`` (the experiment file's variants), else the variant with most users."""
    steps = timeline.cumulative()
    if not steps:
        raise RtrecError(f"experiment {timeline.experiment!r} has no counts yet")
    final = steps[-1][1]
    names = list(dict.fromkeys([*(order or []), *_variant_order(final)]))
    if control is not None:
        if control not in names:
            raise RtrecError(f"no variant {control!r} in experiment {timeline.experiment!r}: {', '.join(names)}")
        names = [control, *(n for n in names if n != control)]
    over_time = [{"bucket_ms": start, **analyse(v, p, names)} for start, v, p in steps]
    _always_valid(over_time)
    return {
        "experiment": timeline.experiment,
        "buckets": len(steps),
        **{key: value for key, value in over_time[-1].items() if key != "bucket_ms"},
        "over_time": over_time,
    }


def _always_valid(steps: list[dict[str, Any]]) -> None:
    """Each comparison's always-valid p-value: the running minimum of its sequential p over the looks so far."""
    lowest: dict[tuple[str, ...], float] = {}
    for step in steps:
        tests: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        if "interleaving" in step:
            tests.append((("interleaving",), step["interleaving"]))
        tests += [
            ((name, metric), entry[metric]["vs_control"])
            for name, entry in step["variants"].items()
            for metric, *_ in METRICS
            if "vs_control" in entry[metric]
        ]
        for key, test in tests:
            if test["sequential_p"] is not None:
                lowest[key] = min(lowest.get(key, 1.0), test["sequential_p"])
            test["always_valid_p"] = lowest.get(key)


def _variant_order(variants: Mapping[str, np.ndarray]) -> list[str]:
    """Without the experiment file: the variant with the most users is taken as the control."""
    return sorted(variants, key=lambda name: (-variants[name][0], name))


def _number(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _p_value(value: float) -> float | None:
    """Three significant digits: a p-value of 1e-9 is not 0."""
    return float(f"{value:.3g}") if math.isfinite(value) else None


def render_text(report: Mapping[str, Any]) -> str:
    """The report as a table a person reads in a terminal."""
    lines = [f"experiment {report['experiment']} (control: {report['control']}, {report['buckets']} buckets)"]
    header = f"{'variant':<16}{'users':>8}{'lists':>9}{'engaged':>9}"
    lines.append(header + "".join(f"{metric:>30}" for metric, *_ in METRICS))
    for name, entry in report["variants"].items():
        row = f"{name:<16}{entry['users']:>8}{_count(entry['lists']):>9}{_count(entry['engagements']):>9}"
        for metric, *_ in METRICS:
            row += f"{_metric_cell(entry[metric]):>30}"
        lines.append(row)
    for name, entry in report["variants"].items():
        for metric, *_ in METRICS:
            versus = entry[metric].get("vs_control")
            if versus and versus["difference"] is not None:
                lines.append(
                    f"  {name} vs {report['control']}, {metric}: {versus['difference']:+.4f} "
                    f"[{_fmt(versus['ci95'][0])}, {_fmt(versus['ci95'][1])}], p = {_fmt(versus['p_value'])} "
                    f"(always valid: {_fmt(versus['always_valid_p'])})"
                )
    if "interleaving" in report:
        chosen = report["interleaving"]
        lines.append(
            f"interleaving: {chosen['prefer_first']} users prefer the first, {chosen['prefer_second']} the second, "
            f"{chosen['tied']} tied; p = {_fmt(chosen['p_value'])} (always valid: {_fmt(chosen['always_valid_p'])})"
        )
    lines.append("metrics: " + "; ".join(f"{metric}: {meaning}" for metric, _, _, meaning in METRICS))
    lines.append(
        "p: for one look at a planned size; always valid: however often the report is read (stop when it is < 0.05)"
    )
    return "\n".join(lines)


def _metric_cell(metric: Mapping[str, Any]) -> str:
    value, (low, high) = metric["value"], metric["ci95"]
    return "-" if value is None else f"{value:.4f} [{_fmt(low)}, {_fmt(high)}]"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_plots(report: Mapping[str, Any], folder: Path, progress: Callable[[str], None] = print) -> list[Path]:
    """Each metric over time with its 95% band, and the p-values against the control (or of the preference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    steps = report["over_time"]
    hours = [(s["bucket_ms"] - steps[0]["bucket_ms"]) / 3_600_000 for s in steps]
    figure, axes = plt.subplots(1, len(METRICS) + 1, figsize=(5 * (len(METRICS) + 1), 4))
    for axis, (metric, _, _, meaning) in zip(axes, METRICS, strict=False):
        for name in report["variants"]:
            values = [_nan(s["variants"][name][metric]["value"]) for s in steps]
            low = [_nan(s["variants"][name][metric]["ci95"][0]) for s in steps]
            high = [_nan(s["variants"][name][metric]["ci95"][1]) for s in steps]
            axis.plot(hours, values, marker=".", label=name)
            axis.fill_between(hours, low, high, alpha=0.2)
        axis.set_title(f"{metric}: {meaning}", fontsize=8)
        axis.set_xlabel("hours since the first bucket (event time)")
    p_axis = axes[-1]
    if "interleaving" in report:
        p_axis.plot(hours, [_nan(s.get("interleaving", {}).get("p_value")) for s in steps], label="preference")
    else:
        for name in list(report["variants"])[1:]:
            versus = [s["variants"][name]["hit_rate"].get("vs_control", {}) for s in steps]
            p_axis.plot(hours, [_nan(v.get("p_value")) for v in versus], label=f"{name}: hit_rate")
    p_axis.axhline(0.05, color="grey", linestyle="--", linewidth=1)
    p_axis.set_yscale("log")
    p_axis.set_title("p-value against the control (dashed: 0.05)", fontsize=8)
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = folder / f"experiment-{report['experiment']}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    progress(f"plots written to {path}")
    return [path]


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
