"""Streaming evaluation: a timestamped log replayed through the real broker and a worker."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from encoder.data import History
from encoder.datasets import load_event_log
from infra.kafka_local import LocalKafka
from streams.tools.workload import Workload
from tests.harness import TEST_WORKLOAD


def _write_log(folder: Path, users: int, events_per_user: int) -> tuple[Path, Path]:
    """Generated users (none the model trained on) in the generic format, with the catalogue's text."""
    workload = Workload(TEST_WORKLOAD)
    events, items = folder / "events.csv", folder / "items.csv"
    with events.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["user_id", "item_id", "type", "ts"])
        for history in workload.histories(users, events_per_user, first_user=20_000_000):
            out.writerows([g.event.user_id, g.event.item_id, g.event.type, g.event.ts] for g in history)
    with items.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["item_id", "text"])
        out.writerows([item.item_id, item.text()] for item in workload.catalog)
    return events, items


def test_a_log_cut_in_time_keeps_each_users_earlier_events_and_replays_in_time_order(tmp_path: Path) -> None:
    events, items = _write_log(tmp_path, users=5, events_per_user=6)
    log = load_event_log(events, "generic", items)
    cut = log.time_quantile(0.5)
    before = log.before(cut)
    assert all((h.ts_ms < cut).all() for h in before.histories.values())
    kept = sum(len(h) for h in before.histories.values())
    assert kept == sum(int((h.ts_ms < cut).sum()) for h in log.histories.values()) and 0 < kept < 30
    replay = log.events()
    assert len(replay) == 30 and [e.ts_ms for e in replay] == sorted(e.ts_ms for e in replay)
    first: History = log.histories[replay[0].user]
    assert replay[0].item == first.items[0] and replay[0].type == first.types[0]


def test_the_streamed_lists_score_as_the_same_model_offline_and_beat_a_popularity_stream(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    events, items = _write_log(tmp_path, users=150, events_per_user=16)
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "streams", f"--kafka-bootstrap={kafka.config.bootstrap}", f"--home={tmp_path}",
         "--encoder-threads=1", "stream-eval", "--format=generic", f"--data={events}", f"--item-text={items}",
         f"--model-dir={models_dir}", "--train-fraction=0.5", "--rate=150", f"--report={report}"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((report / "results.json").read_text())
    print(result.stdout[-1500:])
    assert results["replayed"] == 150 * 16 and results["scored"] > 1000
    metrics = results["metrics"]
    # Sent at a pace a worker keeps up with, the lists users held are the model's own lists.
    assert results["ratio"]["ndcg@10"] >= 0.95 and results["fresh"] >= 0.9, results
    assert metrics["offline"]["ndcg@10"] > 1.5 * metrics["popularity stream"]["ndcg@10"], metrics
    assert len(results["over_time"]) == 10 and (report / "over-time.png").stat().st_size > 0
    assert "Stream / offline" in (report / "report.md").read_text()
