"""`rtrec bench` end to end on the real broker: every phase accounts for every event it sent.

No timing is asserted (the machines are shared); what is checked is that the bench
measures what it says: all events answered, latencies and stage times present,
the naive baseline run with batches of one, and two workers sharing the partitions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from encoder.config import TEXT_BUNDLE
from infra.kafka_local import LocalKafka

pytestmark = pytest.mark.integration


def test_bench_measures_every_phase_through_the_real_pipeline(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    items = 300
    models = tmp_path / "bench-models" / f"{items}-items"
    shutil.copytree(models_dir / TEXT_BUNDLE, models / TEXT_BUNDLE)  # the bench trains its own interest encoder
    result = subprocess.run(
        [sys.executable, "-m", "streams", f"--kafka-bootstrap={kafka.config.bootstrap}", f"--home={tmp_path}",
         "--topic-partitions=4", "--window-size=8", "--encoder-threads=1",
         "bench", f"--items={items}", "--users=30", "--events=400", "--baseline-events=60", "--rate=100",
         "--rate-seconds=2", "--workers=2"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"\| throughput \| micro-batched \| 2 \| 400 \|", out), out[-2000:]
    assert re.search(r"\| baseline \| naive \| 2 \| 60 \| [\d,]+ \| \d+ \| \d+ \| \d+ \| 1\.0 \|", out), out[-2000:]
    assert "speed-up of micro-batching over the naive baseline, same run:" in out

    (results_file,) = (tmp_path / "bench").glob("*/results.json")
    results = json.loads(results_file.read_text())
    assert results["search_recall@10"] > 0.9  # 300 items: HNSW is not even used, the search is exact
    phases = {p["phase"]: p for p in results["phases"]}
    assert [phases[name]["events"] for name in ("warmup", "throughput", "latency", "baseline")] == [240, 400, 200, 60]
    for phase in phases.values():
        assert phase["latency_ms"]["p50"] > 0 and phase["peak_rss_mb"] > 0
        stages = phase["stage_us_per_event"]
        assert stages["encode"] > 0 and stages["search"] > 0 and stages["produce"] > 0  # scraped from /metrics
