"""Model updates without downtime: a new bundle in the model folder is swapped in live."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np

from encoder.config import INTEREST_BUNDLE, BundleManifest
from encoder.runtime import OnnxItemEncoder
from infra.kafka_local import LocalKafka
from infra.processes import free_port
from streams.item_vectors import ItemEmbedder, ItemVectorCache
from streams.pipeline import CatalogBatchProcessor, IncomingMessage, ItemTarget
from streams.recommend import now_ms
from streams.records import Item, encode_item
from streams.settings import Settings
from streams.tools.workload import Workload
from streams.worker.app import load_components
from streams.worker.catalog_sync import items_collection_name
from tests.harness import TEST_WORKLOAD, Pipeline, other_model


def _message(item: Item, offset: int) -> IncomingMessage:
    return IncomingMessage(item.item_id.encode(), encode_item(item), "items", 0, offset)


def test_a_fill_never_overwrites_a_change_the_agent_wrote_from_past_its_end_offsets(
    tmp_path: Path, models_dir: Path
) -> None:
    settings = Settings(home=tmp_path, model_dir=str(models_dir))
    parts = load_components(settings)
    store = parts.store
    for name in ("old", "new"):
        store.ensure_collection(name, parts.item_encoder.dim)
    catalog = CatalogBatchProcessor(
        parts.text_embedder, parts.item_encoder, store, items_collection="old", limits=settings.limits()
    )
    lamp = Workload(TEST_WORKLOAD).catalog[0]
    renamed = Item(lamp.item_id, "a completely different gardening spade", lamp.ts, category="gardening")
    embedder = ItemEmbedder(parts.text_embedder, parts.item_encoder)
    cache = ItemVectorCache(store, "new", capacity=100, ttl_s=60)
    fill = catalog.begin_migration(ItemTarget(embedder, "new", cache), lambda: {0: 5})
    assert fill.ends == {0: 5}

    catalog.process([_message(renamed, 7)])  # the agent, already past the fill's end offset
    (old_version,) = embedder.points([lamp])
    catalog.backfill(fill, {lamp.item_id: old_version})  # the fill, reading offset 2, comes later
    kept = store.fetch_vectors("new", [lamp.item_id])[lamp.item_id]
    np.testing.assert_allclose(kept, embedder.vectors([renamed])[0], rtol=1e-5)
    assert catalog.finish_migration(fill).collection == "old" and catalog.items_collection == "new"
    assert lamp.item_id in store.fetch_vectors("old", [lamp.item_id])  # written for both towers meanwhile


def _model(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=5) as answer:
        return json.loads(answer.read())


def test_a_new_bundle_is_swapped_in_live_with_nothing_lost_and_the_new_items_space(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    served = BundleManifest.read(models / INTEREST_BUNDLE, "interest-encoder").version
    port = free_port()
    pipeline = Pipeline(kafka.config.bootstrap, models, tmp_path / "home", model_reload_s=1, http_port=port)
    pipeline.start()
    try:
        pipeline.publish_catalog()
        workload = pipeline.workload
        category = workload.categories[4]
        before = [g.event for g in workload.scripted_user(990, [(category, 6)], clock=now_ms)]
        pipeline.send_events(before)
        pipeline.collect_until(lambda out: {e.event_id for e in before} <= out.covered_event_ids())

        bundle = other_model(models_dir, tmp_path / "next")
        swapped_to = BundleManifest.read(bundle, "interest-encoder").version
        assert swapped_to != served
        (models / INTEREST_BUNDLE).rename(tmp_path / "retired")
        bundle.rename(models / INTEREST_BUNDLE)

        # Events keep flowing while the worker fills the new tower's collection and switches.
        during, sent = [], 0
        deadline = time.monotonic() + 120
        while _model(port)["interest_encoder"]["version"] != swapped_to:
            assert time.monotonic() < deadline, pipeline.worker_log()[-3000:]
            events = [g.event for g in workload.scripted_user(1000 + sent, [(category, 2)], clock=now_ms)]
            pipeline.send_events(events)
            during += events
            sent += 1
            time.sleep(0.3)
        after = [g.event for g in workload.scripted_user(991, [(category, 6)], clock=now_ms)]
        pipeline.send_events(after)
        wanted = {e.event_id for e in before + during + after}
        outputs = pipeline.collect_until(lambda out: wanted <= out.covered_event_ids(), timeout_s=90)
    finally:
        pipeline.stop()

    models_seen = {r.model for r in outputs.recommendations}
    assert models_seen == {served, swapped_to}
    # One switch, never back. The reader interleaves the topic's two partitions, so arrival order says nothing
    # across users: each user's lists come in order (one key, one partition), and the emit clock orders the rest.
    for user, recs in outputs.by_user().items():
        in_order = [r.model for r in recs]
        if swapped_to in in_order:
            assert set(in_order[in_order.index(swapped_to) :]) == {swapped_to}, user
    last_old = max(r.emitted_ts for r in outputs.recommendations if r.model == served)
    first_new = min(r.emitted_ts for r in outputs.recommendations if r.model == swapped_to)
    assert last_old <= first_new
    latest = max((r for r in outputs.recommendations if r.user_id == after[0].user_id), key=lambda r: r.emitted_ts)
    assert latest.model == swapped_to
    on_topic = sum(workload.category_of[i.item_id] == category for i in latest.items)
    assert on_topic >= 6, [workload.category_of[i.item_id] for i in latest.items]  # the new spaces agree
    tower = OnnxItemEncoder(models / INTEREST_BUNDLE)
    assert items_collection_name("items", tower).endswith(tower.tower_id)
    assert "now serving model " + swapped_to in pipeline.worker_log()
