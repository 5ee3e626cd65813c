"""The console's pipeline page: the worker's metrics sampled once a second into short time series.

Rates are differences of the Prometheus counters between two samples; latency percentiles are
over the lists sent in the last ``LATENCY_SPAN_S`` (each point of the chart) and over the whole
kept span (the headline). Pure of Faust: a timer calls ``sample`` and the page reads ``snapshot``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams.metrics import WorkerMetrics

KEPT_S = 300  # the charts' span: the last five minutes, a point a second
LATENCY_SPAN_S = 10.0  # each point's percentiles are over the lists of the last ten seconds


@dataclass(frozen=True)
class Totals:
    """Counter values at one instant."""

    at: float
    events: float  # read from the events and control topics, whatever their outcome
    batches: float
    lists: float
    dead_letters: dict[str, float]  # by input and the field at fault ("events: field 'ts'")


@dataclass(frozen=True)
class Sample:
    at: float
    events_per_s: float
    lists_per_s: float
    dead_letters_per_s: float
    batch_mean: float | None  # events per micro-batch over the second (None: no batch)
    p50_ms: float | None
    p99_ms: float | None


class PipelineFeed:
    def __init__(self, metrics: WorkerMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=KEPT_S)
        self.last = self.totals()

    def totals(self) -> Totals:
        registry = self.metrics.registry

        def value(name: str, labels: dict[str, str] | None = None) -> float:
            return registry.get_sample_value(name, labels or {}) or 0.0

        letters = {
            _reason(s.labels["input"], s.labels["field"]): s.value
            for metric in self.metrics.dead_letters.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }
        return Totals(
            self.clock(),
            value("rtrec_batch_events_sum"),
            value("rtrec_batch_events_count"),
            value("rtrec_recommendations_total"),
            letters,
        )

    def sample(self) -> Sample:
        now = self.totals()
        last, self.last = self.last, now
        span = max(now.at - last.at, 1e-6)
        batches = now.batches - last.batches
        events = now.events - last.events
        p50, p99 = self._percentiles(now.at - LATENCY_SPAN_S)
        sample = Sample(
            at=now.at,
            events_per_s=events / span,
            lists_per_s=(now.lists - last.lists) / span,
            dead_letters_per_s=(sum(now.dead_letters.values()) - sum(last.dead_letters.values())) / span,
            batch_mean=events / batches if batches else None,
            p50_ms=p50,
            p99_ms=p99,
        )
        self.samples.append(sample)
        return sample

    def _percentiles(self, since: float) -> tuple[float | None, float | None]:
        recent = [seconds for at, seconds in reversed(self.metrics.recent_latencies) if at >= since]
        return _p50_p99(recent)

    def lag(self) -> dict[str, int]:
        """Messages not yet committed, per input partition this worker owns (refreshed every few seconds)."""
        return {
            f"{s.labels['topic']} [{s.labels['partition']}]": int(s.value)
            for metric in self.metrics.consumer_lag.collect()
            for s in metric.samples
        }

    def dead_letters_by_reason(self) -> dict[str, float]:
        """Dead letters since the worker started, by reason, the most frequent first (as of the last sample)."""
        return dict(sorted(self.last.dead_letters.items(), key=lambda kv: -kv[1]))

    def snapshot(self) -> dict[str, Any]:
        """What the pipeline page shows: the headline numbers and the series behind the charts."""
        samples = list(self.samples)
        newest = samples[-1] if samples else None
        kept_since = self.clock() - KEPT_S
        p50, p99 = _p50_p99(s for at, s in self.metrics.recent_latencies if at >= kept_since)
        totals = self.last
        return {
            "at": totals.at,
            "totals": {
                "events": totals.events,
                "lists": totals.lists,
                "dead_letters": sum(totals.dead_letters.values()),
            },
            "now": {
                "events_per_s": newest.events_per_s if newest else 0.0,
                "lists_per_s": newest.lists_per_s if newest else 0.0,
                "dead_letters_per_s": newest.dead_letters_per_s if newest else 0.0,
            },
            "latency": {"p50_ms": p50, "p99_ms": p99, "over_s": KEPT_S},
            "dead_letters_by_reason": self.dead_letters_by_reason(),
            "lag": self.lag(),
            "series": {
                "at": [s.at for s in samples],
                "events_per_s": [s.events_per_s for s in samples],
                "lists_per_s": [s.lists_per_s for s in samples],
                "dead_letters_per_s": [s.dead_letters_per_s for s in samples],
                "batch_mean": [s.batch_mean for s in samples],
                "p50_ms": [s.p50_ms for s in samples],
                "p99_ms": [s.p99_ms for s in samples],
            },
        }


def _reason(input_name: str, field: str) -> str:
    return f"{input_name}: the message as a whole" if field == "record" else f"{input_name}: field '{field}'"


def _p50_p99(seconds: Iterable[float]) -> tuple[float | None, float | None]:
    values = np.fromiter(seconds, dtype=np.float64)
    if not len(values):
        return None, None
    p50, p99 = np.percentile(values, [50, 99]) * 1000
    return round(float(p50), 1), round(float(p99), 1)
