"""User vectors per second of the exported interest encoder, for each provider and precision this
machine has (`rtrec bench-encoder`): CPU float32 always, CPU int8 when the bundle has it, CUDA
float32 and float16 where ONNX Runtime can start CUDA. Every row's speed-up is against CPU float32
at the same batch size, measured in the same run. The cost of a forward pass depends on the
architecture, not on the weights, so without a bundle an untrained model of the stream's
architecture is exported and measured.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder.config import MODEL_FP16_FILE, MODEL_INT8_FILE, BundleManifest, InterestEncoderConfig
from encoder.features import EncoderInputs, WindowArrays, assemble_inputs
from encoder.runtime import OnnxInterestEncoder, cuda_available

WARMUP_CALLS = 5


@dataclass(frozen=True)
class SpeedRow:
    provider: str
    precision: str
    batch: int
    users_per_s: float
    ms_p50: float
    ms_p99: float
    speedup: float  # against CPU float32 at the same batch size


def full_windows(cfg: InterestEncoderConfig, batch: int, length: int, seed: int = 0) -> EncoderInputs:
    """``batch`` windows of ``length`` events a minute apart, with random item vectors and types."""
    rng = np.random.default_rng(seed)
    ts = 1_700_000_000_000 + 60_000 * np.arange(length, dtype=np.int64)
    windows = [
        WindowArrays(
            (0.1 * rng.normal(size=(length, cfg.d_model))).astype(np.float32),
            rng.integers(1, cfg.n_type_ids - 1, size=length),
            ts,
        )
        for _ in range(batch)
    ]
    return assemble_inputs(windows, cfg.d_model, cfg.max_len)


def time_calls(encoder: OnnxInterestEncoder, inputs: EncoderInputs, seconds: float) -> list[float]:
    """Seconds per call, calling for at least ``seconds`` (and at least 10 times) after a warm-up."""
    for _ in range(WARMUP_CALLS):
        encoder.encode_batch(inputs)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 10:
        started = time.perf_counter()
        encoder.encode_batch(inputs)
        times.append(time.perf_counter() - started)
    return times


def variants(bundle: Path) -> list[tuple[str, str]]:
    files = BundleManifest.read(bundle, "interest-encoder").files
    found = [("cpu", "fp32")] + ([("cpu", "int8")] if MODEL_INT8_FILE in files else [])
    if cuda_available():
        found.append(("cuda", "fp32"))
        if MODEL_FP16_FILE in files:
            found.append(("cuda", "fp16"))
    return found


def untrained_stream_bundle(folder: Path, max_len: int) -> Path:
    """An untrained id-only model of the stream's architecture, exported with its float16 and int8 towers."""
    from encoder.build import stream_encoder_config
    from encoder.export import export_interest_encoder
    from encoder.model import InterestEncoder

    cfg = stream_encoder_config(1_000, text_dim=0, max_len=max_len)
    bundle = folder / "untrained"
    ids = [str(i) for i in range(cfg.n_items)]
    export_interest_encoder(InterestEncoder(cfg), ids, bundle, {}, {}, fp16=True, int8=True)
    return bundle


def run_encoder_bench(
    bundle: Path | None,
    batches: Sequence[int],
    length: int,
    seconds: float,
    threads: int,
    progress: Callable[[str], None] = lambda _msg: None,
) -> list[SpeedRow]:
    with tempfile.TemporaryDirectory() as scratch:
        if bundle is None:
            progress("exporting an untrained model of the stream's architecture (weights do not change the cost)…")
            bundle = untrained_stream_bundle(Path(scratch), length)
        rows: list[SpeedRow] = []
        baseline: dict[int, float] = {}
        for provider, precision in variants(bundle):
            encoder = OnnxInterestEncoder(bundle, provider, intra_op_threads=threads, precision=precision)
            for batch in batches:
                inputs = full_windows(encoder.config, batch, min(length, encoder.max_len))
                times = time_calls(encoder, inputs, seconds)
                per_s = batch * len(times) / sum(times)
                baseline.setdefault(batch, per_s)  # the first variant is CPU float32
                rows.append(
                    SpeedRow(
                        encoder.provider.removesuffix("ExecutionProvider"),
                        encoder.precision,
                        batch,
                        per_s,
                        1000 * statistics.median(times),
                        1000 * statistics.quantiles(times, n=100)[98],
                        per_s / baseline[batch],
                    )
                )
                progress(f"  {rows[-1].provider} {precision} batch {batch}: {per_s:,.0f} user vectors/s")
        return rows


def format_table(rows: Sequence[SpeedRow], length: int) -> str:
    lines = [
        f"interest encoder, {length}-event windows; speed-up against CPU float32 at the same batch, this run",
        f"{'provider':<8} {'precision':<9} {'batch':>6} {'user vectors/s':>15} {'ms p50':>8} {'ms p99':>8} "
        f"{'speed-up':>9}",
    ]
    lines += [
        f"{r.provider:<8} {r.precision:<9} {r.batch:>6} {r.users_per_s:>15,.0f} {r.ms_p50:>8.2f} {r.ms_p99:>8.2f} "
        f"{r.speedup:>8.1f}×"
        for r in rows
    ]
    return "\n".join(lines)
