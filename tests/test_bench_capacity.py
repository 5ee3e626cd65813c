"""How `rtrec bench` decides that workers kept up with a capacity probe: served, and the lag not growing."""

from __future__ import annotations

import numpy as np
import pytest

from streams.tools.bench import KEPT_UP_SHARE, PhaseResult, kept_up, lag_growth

RATE = 800.0  # events/s offered
SECONDS = 10.0


def _probe(latencies_ms: np.ndarray, served_share: float = 1.0) -> PhaseResult:
    return PhaseResult(
        name="probe100",
        mode="micro-batched",
        workers=1,
        events=len(latencies_ms),
        seconds=len(latencies_ms) / (RATE * served_share),
        latencies_ms=latencies_ms,
        cpu_percent=90.0,
        peak_rss_mb=500.0,
        stage_us={},
        mean_batch=10.0,
        offered_per_s=RATE,
    )


def _falling_behind(served_share: float, noise_ms: float = 0.0) -> np.ndarray:
    """Latencies of workers serving ``served_share`` of the offered rate from an empty queue, plus jitter."""
    sent_s = np.arange(int(RATE * SECONDS)) / RATE
    answered_s = np.arange(len(sent_s)) / (RATE * served_share)
    jitter = np.random.default_rng(7).uniform(0, noise_ms, len(sent_s))
    return 40.0 + 1000 * (answered_s - sent_s) + jitter


def test_the_lag_growth_is_the_rate_at_which_the_workers_fall_behind() -> None:
    assert lag_growth(_probe(_falling_behind(0.9))) == pytest.approx(1 / 0.9 - 1, rel=0.01)
    assert abs(lag_growth(_probe(_falling_behind(1.0, noise_ms=60.0)))) < 0.01


def test_a_probe_whose_lag_keeps_growing_was_not_kept_up_with_even_when_it_stayed_under_a_second() -> None:
    behind = _falling_behind(0.94)  # ~640 ms behind after 10 s
    assert behind.max() < 1000
    assert not kept_up(_probe(behind, served_share=0.94 * 1.04))  # served counts the drain after the last send
    assert kept_up(_probe(_falling_behind(1.0, noise_ms=80.0)))
    assert kept_up(_probe(_falling_behind(KEPT_UP_SHARE + 0.005)))


def test_a_probe_served_short_or_too_small_to_judge_was_not_kept_up_with() -> None:
    assert not kept_up(_probe(_falling_behind(1.0), served_share=0.9))
    assert not kept_up(_probe(np.array([30.0, 40.0, 50.0])))
