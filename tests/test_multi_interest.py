"""Users of two interests see both: a model of two interests through the real broker and worker."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from encoder.config import TEXT_BUNDLE
from infra.kafka_local import LocalKafka
from streams.recommend import now_ms
from streams.tools.stream_model import ensure_interest_encoder
from tests.harness import TEST_ENCODER, TEST_WORKLOAD, Pipeline

# The test catalogue, with users who draw 30% of their events from a second, standing interest.
TWO_INTEREST_USERS = dataclasses.replace(TEST_WORKLOAD, second_interest_prob=0.3)
USERS = 40  # with 10, the comparison was left to chance: one training's model showed both to 5, the next to 8


def _models(models_dir: Path, folder: Path, interests: int) -> Path:
    folder.mkdir()
    shutil.copytree(models_dir / TEXT_BUNDLE, folder / TEXT_BUNDLE)
    overrides = {**TEST_ENCODER, "interests": interests, "epochs": 80, "patience": 15}
    ensure_interest_encoder(folder, TWO_INTEREST_USERS, overrides, n_users=200, events_per_user=30)
    return folder


def test_users_of_two_interests_are_shown_both(kafka: LocalKafka, models_dir: Path, tmp_path: Path) -> None:
    # The same data learnt with one user vector and with two.
    pipelines = {
        k: Pipeline(kafka.config.bootstrap, _models(models_dir, tmp_path / f"models-{k}", k), tmp_path / f"home-{k}")
        for k in (1, 2)
    }
    shown_both = {}
    try:
        for running in pipelines.values():
            running.start().publish_catalog()
        workload = pipelines[2].workload
        # Each alternates between music and gaming, event after event.
        users = [
            [g.event for g in workload.scripted_user(995 + n, [("music", 1), ("gaming", 1)] * 4, clock=now_ms)]
            for n in range(USERS)
        ]
        wanted = {e.event_id for events in users for e in events}
        for k, running in pipelines.items():
            running.send_events([e for events in users for e in events])
            out = running.collect_until(lambda o: wanted <= o.covered_event_ids(), timeout_s=60)
            shown_both[k] = 0
            for events in users:
                ids = {e.event_id for e in events}
                latest = max((r for r in out.recommendations if set(r.event_ids) & ids), key=lambda r: r.emitted_ts)
                kinds = [workload.category_of[i.item_id] for i in latest.items]
                shown_both[k] += kinds.count("music") >= 3 and kinds.count("gaming") >= 3
    finally:
        for running in pipelines.values():
            running.stop()
    # Each run trains both models afresh. Measured on 40 such users: 24-25 shown both with two interests, 12-14
    # with one (on 20 users, over six runs: 11-14 against 7-9).
    assert shown_both[2] >= USERS // 2 and shown_both[2] >= shown_both[1] + USERS // 10, shown_both
