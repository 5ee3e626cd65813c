"""Training from a replay of the pipeline's own topics, through the real broker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack

from encoder.config import INTEREST_BUNDLE, TEXT_BUNDLE
from infra.kafka_local import LocalKafka
from infra.topics import ensure_pipeline_topics
from streams.cli import main
from streams.clients.helpers import Publisher
from streams.clients.kafka_io import make_producer
from streams.clients.topic_log import read_topic_log
from streams.settings import Settings
from streams.tools.workload import Workload
from tests.harness import TEST_WORKLOAD, isolated_names


def test_the_stream_model_trains_on_a_replay_of_its_topics_without_what_was_erased(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / TEXT_BUNDLE, models / TEXT_BUNDLE)
    names = isolated_names()
    settings = Settings(home=tmp_path, kafka_bootstrap=kafka.config.bootstrap, model_dir=str(models))
    settings = settings.with_overrides(**names)
    ensure_pipeline_topics(settings)
    workload = Workload(TEST_WORKLOAD)
    histories = [[g.event for g in h] for h in workload.histories(150, 20, first_user=30_000_000)]
    deleted = workload.catalog[-1].item_id
    with Publisher(settings) as publisher:
        for item in workload.catalog:
            publisher.publish_item(item)
        publisher.delete_item(deleted)
        for history in histories:
            for event in history:
                publisher.publish_event(event)
        publisher.publish_event(histories[0][0])  # delivered twice
        publisher.forget_user(histories[1][0].user_id)  # after all of that user's events
    producer = make_producer(settings)
    producer.send(settings.events_topic, key=b"someone", value=msgpack.packb({"v": 1, "type": "view"}))
    producer.close()

    topics = read_topic_log(settings)
    on_deleted = sum(e.item_id == deleted for h in histories[:1] + histories[2:] for e in h)
    assert topics.counts["undecodable"] == 1 and topics.counts["repeated event id"] == 1
    assert topics.counts["forgotten user"] == 20 and topics.counts["unknown item"] == on_deleted
    assert topics.counts["kept"] == 149 * 20 - on_deleted and len(topics.log.item_ids) == len(workload.catalog) - 1
    assert histories[1][0].user_id not in topics.log.histories
    kept = topics.log.histories[histories[0][0].user_id]
    assert list(kept.ts_ms) == sorted(kept.ts_ms)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in names.items()]
    argv = [f"--kafka-bootstrap={kafka.config.bootstrap}", f"--home={tmp_path}", f"--model-dir={models}", *flags]
    assert main([*argv, "train", "--from-topics", "--epochs=3", "--patience=3"]) == 0
    manifest = json.loads((models / INTEREST_BUNDLE / "manifest.json").read_text())
    assert manifest["training"]["items"] == len(workload.catalog) - 1
    assert manifest["training"]["train_users"] == 149 and manifest["metrics"]["val_hr@10"] > 0
