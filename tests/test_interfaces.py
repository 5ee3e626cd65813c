"""What users plug into, against a running worker on the real broker: the HTTP API, the
metrics endpoint, the publishing and reading helpers, and the load-items and tail commands."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from infra.kafka_local import LocalKafka
from infra.processes import free_port
from streams.cli import main
from streams.clients.helpers import Publisher, RecommendationReader
from streams.errors import InvalidRecord
from streams.metrics import runqueue_seconds
from streams.recommend import REASON_VERBS, now_ms
from streams.records import Event, Recommendation
from streams.settings import Settings
from streams.tools.worker_runner import WorkerProcess, wait_group_ready
from tests.harness import Pipeline, forget_and_ask, http_get, http_text

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(kafka: LocalKafka, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("interfaces")
    running = Pipeline(
        kafka.config.bootstrap, models_dir, home, http_port=free_port(), metrics_port=free_port(), console=True
    )
    running.start()
    try:
        running.publish_catalog()
        yield running
    finally:
        running.stop()


def _get(pipeline: Pipeline, path: str) -> tuple[int, Any]:
    return http_get(pipeline.settings.http_port, path)


def _metrics(pipeline: Pipeline) -> dict[str, float]:
    """Every sample of the worker's /metrics as {'name{labels}': value}."""
    url = f"http://127.0.0.1:{pipeline.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _events(pipeline: Pipeline, user_index: int, category: str, n: int) -> list[Event]:
    return [g.event for g in pipeline.workload.scripted_user(user_index, [(category, n)], clock=now_ms)]


def _latest_for(pipeline: Pipeline, events: list[Event]) -> Recommendation:
    wanted = {e.event_id for e in events}
    outputs = pipeline.collect_until(lambda out: wanted <= out.accounted_event_ids(), timeout_s=60)
    return max((r for r in outputs.recommendations if set(r.event_ids) & wanted), key=lambda r: r.emitted_ts)


def _flags(settings: Settings) -> list[str]:
    names = ("kafka_bootstrap", "app_id", "items_topic", "recommendations_topic", "events_topic")
    return [arg for name in names for arg in (f"--{name.replace('_', '-')}", str(getattr(settings, name)))]


def test_a_forgotten_users_list_is_a_404_naming_it_or_the_trending_list(pipeline: Pipeline) -> None:
    events = _events(pipeline, 905, pipeline.workload.categories[2], 5)
    pipeline.send_events(events)
    _latest_for(pipeline, events)
    forget_and_ask(pipeline, events[0].user_id)
    assert _get(pipeline, "/trending?k=3")[1]["items"]  # so the fallback above was a real list


def test_the_http_api_serves_the_users_current_list_with_k_and_filters(pipeline: Pipeline) -> None:
    workload = pipeline.workload
    category = workload.categories[1]
    events = _events(pipeline, 901, category, 6)
    pipeline.send_events(events)
    streamed = _latest_for(pipeline, events)
    user = events[0].user_id

    status, body = _get(pipeline, f"/users/{user}/recommendations")
    assert status == 200, body
    # The same window and model as the stream's last refresh give the same list.
    assert [i["item_id"] for i in body["items"]] == [i.item_id for i in streamed.items]
    assert body["model"] == streamed.model and body["window_events"] == 6
    assert body["as_of_event_id"] == max(events, key=lambda e: (e.ts, e.event_id)).event_id  # the window's order
    window_items = {e.item_id for e in events}
    for item in body["items"]:  # each reason names one or two events that are really in the window
        named = item["explained_by"]
        assert item["reason"].startswith("because you ") and 1 <= len(named) <= 2 and set(named) <= window_items

    status, body = _get(pipeline, f"/users/{user}/recommendations?k=3")
    assert status == 200 and [i["item_id"] for i in body["items"]] == [i.item_id for i in streamed.items[:3]]

    other = workload.categories[4]
    status, body = _get(pipeline, f"/users/{user}/recommendations?k=15&category={other}")
    assert status == 200 and len(body["items"]) == 15
    assert {workload.category_of[i["item_id"]] for i in body["items"]} == {other}

    excluded = ",".join(workload.categories[:3])
    status, body = _get(pipeline, f"/users/{user}/recommendations?exclude_category={excluded}")
    assert status == 200 and len(body["items"]) == 10
    assert not {workload.category_of[i["item_id"]] for i in body["items"]} & set(workload.categories[:3])

    price = {item.item_id: item.price for item in workload.catalog}
    status, body = _get(pipeline, f"/users/{user}/recommendations?min_price=50&max_price=120")
    assert status == 200 and body["items"]
    assert all(50 <= (price[i["item_id"]] or 0) <= 120 for i in body["items"])
    assert not window_items & {i["item_id"] for i in body["items"]}  # filters keep the window exclusion


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("?k=0", 400, "k must be between 1 and 100"),
        ("?k=many", 400, "k must be an integer"),
        ("?k=101", 400, "k must be between 1 and 100"),
        ("?min_price=cheap", 400, "min_price must be a number"),
        ("?min_price=20&max_price=10", 400, "min_price 20 is above max_price 10"),
        ("?colour=red", 400, "unknown parameter(s): colour"),
    ],
)
def test_the_http_api_refuses_bad_parameters(pipeline: Pipeline, query: str, status: int, message: str) -> None:
    events = _events(pipeline, 902, pipeline.workload.categories[0], 1)
    pipeline.send_events(events)
    _latest_for(pipeline, events)
    code, body = _get(pipeline, f"/users/{events[0].user_id}/recommendations{query}")
    assert (code, body["error"][: len(message)]) == (status, message)


def test_the_http_api_answers_health_readiness_model_and_unknown_users(pipeline: Pipeline) -> None:
    assert _get(pipeline, "/users/nobody-ever/recommendations") == (
        404,
        {"error": "unknown user 'nobody-ever': no events in the window"},
    )
    assert _get(pipeline, "/health") == (200, {"status": "ok"})
    status, body = _get(pipeline, "/ready")
    assert status == 200 and body["ready"] is True
    status, body = _get(pipeline, "/model")
    assert status == 200
    assert body["interest_encoder"]["provider"] == "CPUExecutionProvider" and body["top_k"] == 10
    assert body["text_encoder"]["dim"] == 384 and body["interest_encoder"]["dim"] > 0


def test_metrics_count_exactly_what_a_known_run_did(pipeline: Pipeline) -> None:
    before = _metrics(pipeline)
    events = _events(pipeline, 903, pipeline.workload.categories[2], 7)
    user = events[0].user_id
    bad_ts = msgpack.packb({"v": 1, "event_id": "m-1", "user_id": user, "item_id": "x", "type": "view", "ts": "now"})
    unknown_item = Publisher.event(user, "no-such-item", "view", event_id="m-2")
    pipeline.send_events([*events, unknown_item])
    pipeline.send_raw(user.encode(), bad_ts)
    pipeline.producer.flush()
    pipeline.collect_until(
        lambda out: (
            {e.event_id for e in events} <= out.covered_event_ids() and {"m-1", "m-2"} <= out.dead_lettered_event_ids()
        ),
        timeout_s=60,
    )
    pipeline.wait_caught_up(pipeline.settings.events_topic)
    after = _metrics(pipeline)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('rtrec_events_total{outcome="added"}') == 7
    assert delta('rtrec_events_total{outcome="dead_lettered"}') == 2
    assert delta('rtrec_dead_letters_total{field="ts",input="events"}') == 1
    assert delta('rtrec_dead_letters_total{field="item_id",input="events"}') == 1
    assert delta("rtrec_recommendations_total") >= 1
    assert after['rtrec_stage_seconds_count{stage="encode"}'] > before.get(
        'rtrec_stage_seconds_count{stage="encode"}', 0
    )
    # The events thread's clocks: its own CPU is a part of the wall time its batches took there, and so is its
    # wait for a core where the kernel tells it.
    wall = delta('rtrec_events_thread_seconds_total{clock="wall"}')
    assert 0 < delta('rtrec_events_thread_seconds_total{clock="cpu"}') <= wall + 1e-3
    if runqueue_seconds() is not None:
        assert 0 <= delta('rtrec_events_thread_seconds_total{clock="runqueue"}') <= wall + 1e-3
    # The lag gauge covers each events partition the worker owns, and drains to zero.
    topic = pipeline.settings.events_topic
    deadline = time.monotonic() + 30
    while True:
        lags = {k: v for k, v in _metrics(pipeline).items() if k.startswith("rtrec_consumer_lag") and topic in k}
        if len(lags) == pipeline.settings.topic_partitions and not any(lags.values()):
            break
        assert time.monotonic() < deadline, lags
        time.sleep(1)
    assert all(re.search(r'partition="\d+"', k) for k in lags)


def test_publisher_and_reader_round_trip_through_the_broker(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    events = _events(pipeline, 904, pipeline.workload.categories[3], 4)
    with RecommendationReader(settings) as reader, Publisher(settings) as publisher:
        with pytest.raises(InvalidRecord, match="unknown event type 'teleport'"):
            publisher.publish_event(Publisher.event("u-1", "item-1", "teleport"))
        with pytest.raises(InvalidRecord, match="item_id"):
            publisher.delete_item("")
        for event in events:
            publisher.publish_event(event)
        publisher.flush()
        wanted = {e.event_id for e in events}
        seen: list[Recommendation] = []
        deadline = time.monotonic() + 60
        while not wanted <= {i for rec in seen for i in rec.event_ids}:
            assert time.monotonic() < deadline, seen
            seen.extend(rec for rec in reader.poll(1.0) if rec.user_id == events[0].user_id)
    assert all(isinstance(rec, Recommendation) and len(rec.items) == 10 for rec in seen)
    # A reader in a consumer group replays the topic from the start and sees the same records.
    with RecommendationReader(settings, group_id=f"{settings.app_id}-readers", from_beginning=True) as grouped:
        deadline = time.monotonic() + 60
        replayed: set[str] = set()
        while not wanted <= replayed:
            assert time.monotonic() < deadline
            replayed |= {i for rec in grouped.poll(1.0) for i in rec.event_ids}


def test_load_items_checks_the_whole_file_then_publishes_and_tail_prints_the_list(
    pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = pipeline.settings
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,title,price\nnew-1,A lamp,12.5\nnew-2,,3\nnew-3,A chair,cheap\n")
    assert main([*_flags(settings), "load-items", str(bad)]) == 2
    error = capsys.readouterr().err
    assert (
        "2 bad row(s), nothing sent" in error
        and "bad.csv:3: field 'title'" in error
        and "bad.csv:4: field 'price'" in error
    )

    good = tmp_path / "items.jsonl"
    rows = [
        {"item_id": f"loaded-{i}", "title": f"Loaded lamp {i}", "category": "home", "tags": ["lamp"], "price": 10 + i}
        for i in range(3)
    ]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main([*_flags(settings), "load-items", str(good), "--wait", "--wait-timeout", "90"]) == 0
    assert "3 items published" in capsys.readouterr().out

    # Events on the loaded items are accepted (an unknown item would be dead-lettered).
    user = "tail-user-905"
    events = [Publisher.event(user, f"loaded-{i}", "click", event_id=f"tail-{i}") for i in range(3)]
    pipeline.send_events(events)
    rec = _latest_for(pipeline, events)
    assert set(rec.event_ids) <= {e.event_id for e in events} and rec.items
    args = ["tail", "--from-beginning", "--user", user, "--count", "1", "--idle-timeout", "30"]
    assert main([*_flags(settings), *args]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert f"{user} → " in line and "ms after the event" in line and "because you clicked Loaded lamp " in line


def test_the_demo_producer_feeds_a_running_worker(pipeline: Pipeline) -> None:
    covered_before = len(pipeline.outputs.covered_event_ids())
    letters_before = len(pipeline.outputs.dead_letters)
    workload = pipeline.workload.config
    args = ["produce", "--events", "30", "--rate", "300", "--no-catalog"]
    assert main([*_flags(pipeline.settings), *args, "--items", str(workload.n_items), "--users", "5"]) == 0
    outputs = pipeline.collect_until(lambda out: len(out.covered_event_ids()) >= covered_before + 30, timeout_s=60)
    assert len(outputs.dead_letters) == letters_before


def test_a_request_reaching_the_other_worker_is_forwarded_to_the_users_owner(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    users = [_events(pipeline, 910 + n, pipeline.workload.categories[n % 8], 3) for n in range(8)]
    for events in users:
        pipeline.send_events(events)
    for events in users:
        _latest_for(pipeline, events)
    # A second worker with its own, empty embedded store: any list it serves with items came
    # from the first worker, which holds the catalogue.
    second = dataclasses.replace(pipeline.settings, home=tmp_path, http_port=free_port(), metrics_port=0)
    worker = WorkerProcess(second, tmp_path / "worker.log")
    try:
        assert pipeline.worker is not None
        wait_group_ready([pipeline.worker, worker])
        ports = (pipeline.settings.http_port, second.http_port)
        deadline = time.monotonic() + 90
        while True:  # until the rebalance has settled and both answer every user
            answers = {
                (port, events[0].user_id): http_get(port, f"/users/{events[0].user_id}/recommendations")
                for events in users
                for port in ports
            }
            if all(status == 200 for status, _ in answers.values()):
                break
            assert time.monotonic() < deadline, {k: v[0] for k, v in answers.items()}
            time.sleep(1)
        for events in users:
            first, other = (answers[port, events[0].user_id][1] for port in ports)
            assert first == other  # whichever worker is asked, the owner answers
        forwarded = [e[0].user_id for e in users if answers[ports[1], e[0].user_id][1]["items"]]
        assert forwarded, "no user was forwarded from the second worker to the first"
        for user in forwarded:  # the console's user page too: the owner renders it
            status, page = http_text(ports[1], f"/console/users/{user}")
            assert status == 200 and "<table id=list>" in page and "because you " in page
    finally:
        worker.stop()


def test_diversity_and_standing_rules_shape_the_streamed_list(
    pipeline: Pipeline, kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    workload = pipeline.workload
    denied = workload.categories[2]
    shaped = Pipeline(kafka.config.bootstrap, models_dir, tmp_path, rerank_diversity=0.7, deny_categories=denied)
    shaped.start()
    try:
        shaped.publish_catalog()
        events = _events(pipeline, 930, workload.categories[3], 8)
        lists = {}
        for running in (pipeline, shaped):
            running.send_events(events)
            lists[running] = [i.item_id for i in _latest_for(running, events).items]
    finally:
        shaped.stop()
    plain, diverse = ({workload.category_of[i] for i in lists[p]} for p in (pipeline, shaped))
    assert len(lists[shaped]) == 10 and denied not in diverse
    assert len(diverse) > len(plain), (plain, diverse)  # one interest, yet the list spans more kinds


def test_a_dislike_skip_or_return_pushes_similar_items_down(pipeline: Pipeline) -> None:
    by_category: dict[str, list[str]] = {}
    for item_id, category in sorted(pipeline.workload.category_of.items()):
        by_category.setdefault(category, []).append(item_id)
    music, gaming = by_category["music"], by_category["gaming"]
    start = now_ms()

    def history(user: str, last_type: str) -> list[Event]:
        seen = [(item, "view") for item in music[:4] + gaming[:4]] + [(item, last_type) for item in gaming[4:7]]
        return [
            Publisher.event(user, item, kind, ts=start + n, event_id=f"{user}-{n}")
            for n, (item, kind) in enumerate(seen)
        ]

    users = {kind: history(f"{kind}s-gaming-940", kind) for kind in ("view", "dislike", "skip", "return")}
    pipeline.send_events([event for events in users.values() for event in events])
    lists = {kind: _latest_for(pipeline, events).items for kind, events in users.items()}
    gaming_in = {kind: sum(item.item_id in gaming for item in items) for kind, items in lists.items()}
    for rejection in ("dislike", "skip", "return"):
        # Same items seen, but three of them rejected: gaming sinks in that user's list.
        assert gaming_in[rejection] < gaming_in["view"], (rejection, gaming_in)
        assert not any(REASON_VERBS[rejection] in item.reason for item in lists[rejection])


def test_a_user_with_no_history_gets_what_is_trending_in_stream(pipeline: Pipeline) -> None:
    by_category: dict[str, list[str]] = {}
    for item_id, category in sorted(pipeline.workload.category_of.items()):
        by_category.setdefault(category, []).append(item_id)
    hit, runner_up = by_category["kitchen"][-1], by_category["gardening"][-1]
    start = now_ms()
    crowd = [
        Publisher.event(f"crowd-{n}", item, "view", ts=start, event_id=f"crowd-{item}-{n}")
        for item, times in ((hit, 40), (runner_up, 35))
        for n in range(times)
    ]
    pipeline.send_events(crowd)
    pipeline.collect_until(lambda out: {e.event_id for e in crowd} <= out.covered_event_ids(), timeout_s=60)

    status, body = _get(pipeline, "/trending?k=2")
    assert status == 200 and [i["item_id"] for i in body["items"]] == [hit, runner_up], body
    assert body["items"][0]["score"] == 1.0 and 0.8 < body["items"][1]["score"] < 0.95  # 35 / 40 of the weight
    status, body = _get(pipeline, "/trending?k=1&category=gardening")
    assert [i["item_id"] for i in body["items"]] == [runner_up]
    status, body = _get(pipeline, "/users/newcomer-950/recommendations?k=2&fallback=trending")
    assert status == 200 and body["source"] == "trending" and [i["item_id"] for i in body["items"]] == [hit, runner_up]
    assert _get(pipeline, "/users/newcomer-950/recommendations?fallback=popular")[0] == 400
