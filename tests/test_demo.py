"""The main job, `rtrec demo`, end to end against the session's broker: the quick start stays true."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from encoder.config import TEXT_BUNDLE
from infra.kafka_local import LocalKafka
from tests.harness import isolated_names

pytestmark = pytest.mark.integration


def test_demo_streams_events_into_recommendations(kafka: LocalKafka, models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / TEXT_BUNDLE, models / TEXT_BUNDLE)  # the demo trains its own interest encoder
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in isolated_names().items()]
    result = subprocess.run(
        [sys.executable, "-m", "streams", f"--kafka-bootstrap={kafka.config.bootstrap}", f"--home={tmp_path}",
         f"--model-dir={models}", "--topic-partitions=2", *flags,
         "demo", "--events=500", "--rate=250", "--users=40", "--items=240"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"valid events reflected in a recommendation\s+500 / 500", out), out[-2000:]
    assert re.search(r"events in\s+502 \(2 malformed on purpose\)", out), out[-2000:]
    assert re.search(r"dead-lettered\s+2\n", out), out[-2000:]
    share = float(re.search(r"current interest\s+([\d.]+)%", out).group(1))  # type: ignore[union-attr]
    assert share > 50.0, out[-2000:]  # chance is 12.5 %
    assert "epoch 1/" in out  # training progress is shown
