"""A model of two interests through the real broker and worker: both vectors searched, lists merged."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

from encoder.build import ensure_interest_encoder
from encoder.config import TEXT_BUNDLE
from infra.kafka_local import LocalKafka, free_port
from streams.recommend import now_ms
from tests.conftest import TEST_ENCODER
from tests.harness import TEST_WORKLOAD, Pipeline


def test_a_model_of_two_interests_serves_the_stream(kafka: LocalKafka, models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(models_dir / TEXT_BUNDLE, models / TEXT_BUNDLE)
    bundle = ensure_interest_encoder(
        models, TEST_WORKLOAD, {**TEST_ENCODER, "interests": 2}, n_users=200, events_per_user=30
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["config"]["interests"] == 2
    port = free_port()
    pipeline = Pipeline(kafka.config.bootstrap, models, tmp_path / "home", http_port=port).start()
    try:
        pipeline.publish_catalog()
        workload = pipeline.workload
        category = workload.categories[2]
        events = [g.event for g in workload.scripted_user(996, [(category, 6)], clock=now_ms)]
        pipeline.send_events(events)
        wanted = {e.event_id for e in events}
        out = pipeline.collect_until(lambda o: wanted <= o.covered_event_ids(), timeout_s=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=5) as answer:
            served = json.loads(answer.read())["interest_encoder"]
    finally:
        pipeline.stop()
    assert served["interests"] == 2 and served["version"] == manifest["version"]
    latest = max((r for r in out.recommendations if set(r.event_ids) & wanted), key=lambda r: r.emitted_ts)
    shown = [workload.category_of[i.item_id] for i in latest.items]
    # Merged in turns from both interests, the list of a user of one interest stays on it.
    assert len(shown) == 10 and shown.count(category) >= 6, shown
