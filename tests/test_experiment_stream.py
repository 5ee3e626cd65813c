"""An experiment run through the real broker and a real worker: the trained interest encoder, the
popularity list and a deliberately broken variant split the users; simulated users act on their lists
as the workload's users would; `rtrec experiment report` must name the better variants with
significance, from the counts the worker kept (across a restart half-way)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encoder.config import BundleManifest
from infra.kafka_local import LocalKafka
from infra.processes import free_port
from streams.cli import main
from streams.experiments.assignment import variant_of
from streams.experiments.config import load_experiment
from streams.recommend import now_ms
from streams.records import Event, Recommendation
from tests.harness import Outputs, Pipeline, http_get, other_model

pytestmark = pytest.mark.integration

USERS = 150
ROUNDS = 16
# Broken on purpose: after its first pick, every item is chosen for being unlike the items picked.
EXPERIMENT = """
name = "encoder-vs-popular"
attribution_window_s = 1800
report_bucket_s = 300

[[variant]]
name = "encoder"
share = 40

[[variant]]
name = "popular"
share = 30
baseline = "trending"

[[variant]]
name = "broken"
share = 30
rerank = { diversity = 0.99 }
"""


@pytest.fixture(scope="module")
def pipeline(kafka: LocalKafka, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("experiment")
    (home / "experiment.toml").write_text(EXPERIMENT)
    running = Pipeline(
        kafka.config.bootstrap,
        models_dir,
        home,
        experiments=str(home / "experiment.toml"),
        http_port=free_port(),
        model_reload_s=1,
    ).start()
    try:
        running.publish_catalog()
        yield running
    finally:
        running.stop()


def _answered(pipeline: Pipeline, trigger_ids: set[str]) -> list[Recommendation]:
    """The lists answering these events, once every one of them has arrived."""

    def done(out: Outputs) -> bool:
        return trigger_ids <= {r.trigger_event_id for r in out.recommendations}

    outputs = pipeline.collect_until(done, timeout_s=90)
    return [r for r in outputs.recommendations if r.trigger_event_id in trigger_ids]


def _play_rounds(pipeline: Pipeline, histories: list[list[Event]], rounds: range) -> None:
    """Each round, every user's next event, and then their new lists before the next round: what a user does
    next can only meet the lists they had received."""
    for round_ in rounds:
        pipeline.send_events([history[round_] for history in histories])
        _answered(pipeline, {history[round_].event_id for history in histories})


def _flags(pipeline: Pipeline) -> list[str]:
    settings = pipeline.settings
    return [
        "--kafka-bootstrap",
        settings.kafka_bootstrap,
        "--app-id",
        settings.app_id,
        "--experiments",
        settings.experiments,
    ]


def test_the_report_finds_the_better_variants_from_the_counts_kept_in_the_stream(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    histories = [[g.event for g in h] for h in pipeline.workload.histories(USERS, ROUNDS, first_user=5_000)]
    _play_rounds(pipeline, histories, range(ROUNDS // 2))
    pipeline.restart_worker()  # the users' experiment state and the counts come back from the changelogs
    _play_rounds(pipeline, histories, range(ROUNDS // 2, ROUNDS))
    config = load_experiment(Path(pipeline.settings.experiments), pipeline.settings)
    for rec in pipeline.outputs.recommendations:
        assert rec.experiment == config.name and rec.variant == variant_of(config, rec.user_id).name, rec
    pipeline.wait_caught_up(pipeline.settings.events_topic)

    capsys.readouterr()
    assert main([*_flags(pipeline), "experiment", "report", "--format", "json", "--plots", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    variants = report["variants"]
    assert report["control"] == "encoder" and set(variants) == {"encoder", "popular", "broken"}
    assert sum(v["users"] for v in variants.values()) == USERS
    assert sum(v["lists"] for v in variants.values()) == USERS * ROUNDS
    for worse in ("popular", "broken"):
        versus = variants[worse]["hit_rate"]["vs_control"]
        assert versus["difference"] < 0 and versus["ci95"][1] < 0 and versus["p_value"] < 0.01, (worse, variants)
        assert versus["always_valid_p"] < 0.05, (worse, variants)
    assert report["buckets"] > 1 and (tmp_path / "experiment-encoder-vs-popular.png").stat().st_size > 10_000
    assert main([*_flags(pipeline), "experiment", "report"]) == 0
    table = capsys.readouterr().out
    print(table)  # the run's figures, for the record
    assert "broken vs encoder, hit_rate: -" in table and "popular vs encoder, hit_rate: -" in table

    # The HTTP API answers a user from their variant, and says so.
    user = next(h[0].user_id for h in histories if variant_of(config, h[0].user_id).name == "popular")
    status, body = http_get(pipeline.settings.http_port, f"/users/{user}/recommendations?k=4")
    assert status == 200 and body["experiment"] == config.name and body["variant"] == "popular", body
    assert body["model"] == "trending" and len(body["items"]) == 4


def test_a_variant_model_named_by_a_changed_file_is_loaded_live_with_its_own_item_tower(
    pipeline: Pipeline, models_dir: Path, tmp_path: Path
) -> None:
    bundle = other_model(models_dir, tmp_path / "candidate")
    candidate = BundleManifest.read(bundle, "interest-encoder").version
    Path(pipeline.settings.experiments).write_text(
        'name = "candidate-model"\n[[variant]]\nname = "served"\nshare = 0\n'
        f'[[variant]]\nname = "candidate"\nshare = 1\nmodel = "{bundle.parent}"\n'
    )
    # Events keep flowing while the worker loads the model and fills its tower's collection from the catalogue.
    workload, category = pipeline.workload, pipeline.workload.categories[3]
    deadline, user = time.monotonic() + 120, 7_000
    while not any(r.model == candidate for r in pipeline.outputs.recommendations):
        assert time.monotonic() < deadline, pipeline.worker_log()[-3000:]
        events = [g.event for g in workload.scripted_user(user, [(category, 2)], clock=now_ms)]
        pipeline.send_events(events)
        _answered(pipeline, {events[-1].event_id})
        user += 1
    after = [g.event for g in workload.scripted_user(user, [(category, 6)], clock=now_ms)]
    pipeline.send_events(after)
    (latest,) = _answered(pipeline, {after[-1].event_id})
    assert latest.model == candidate and (latest.experiment, latest.variant) == ("candidate-model", "candidate")
    on_topic = sum(workload.category_of[i.item_id] == category for i in latest.items)
    assert on_topic >= 6, [workload.category_of[i.item_id] for i in latest.items]  # its own items space
    assert "experiment 'candidate-model' now running" in pipeline.worker_log()
