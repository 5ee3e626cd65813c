"""How `rtrec bench` judges its paced phases (kept up with: served, and the lag not growing) and shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.tools.bench import KEPT_UP_SHARE, PhaseResult, kept_up, lag_growth, write_timelines

RATE = 800.0  # events/s offered
SECONDS = 10.0


def _probe(latencies_ms: np.ndarray, served_share: float = 1.0, name: str = "probe100") -> PhaseResult:
    return PhaseResult(
        name=name,
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
        sent_ms=1000 * np.arange(len(latencies_ms)) / RATE,
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


def test_each_paced_phase_latency_over_time_is_kept_and_plotted(tmp_path: Path) -> None:
    flat, behind = _falling_behind(1.0, noise_ms=20.0), _falling_behind(0.9)
    drained = _probe(flat)
    drained.offered_per_s = 0.0  # a max-rate phase: its latency is a drain, not a timeline
    write_timelines(tmp_path, [drained, _probe(behind, name="probe90"), _probe(flat, name="load50")])
    with np.load(tmp_path / "latency.npz") as kept:
        assert sorted(kept.files) == ["load50_latency_ms", "load50_sent_s", "probe90_latency_ms", "probe90_sent_s"]
        np.testing.assert_allclose(kept["probe90_latency_ms"], behind, rtol=1e-6)
        assert kept["probe90_sent_s"][-1] == pytest.approx((len(behind) - 1) / RATE)
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")
