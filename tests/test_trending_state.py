"""The trending list (the cold-start fallback) outlives a worker and spans workers, through the real
broker: a restarted worker answers /trending from the snapshots it kept, and with two workers either
one answers from every partition. The item co-occurrence outlives a restart the same way."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.kafka_local import LocalKafka
from infra.processes import free_port
from streams.clients.helpers import Publisher
from streams.recommend import now_ms
from streams.tools.worker_runner import WorkerProcess, wait_group_ready
from streams.worker.partition_keeper import TRENDING_SNAPSHOT_S
from tests.harness import Pipeline, http_get, http_text

pytestmark = pytest.mark.integration


def _ranked(port: int, path: str = "/trending?k=5") -> list[tuple[str, float]]:
    status, body = http_get(port, path)
    assert status == 200, body
    return [(item["item_id"], round(item["score"], 4)) for item in body["items"]]


def _eventually(check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "never came true"
        time.sleep(0.2)
    return result


def test_trending_and_cooccurrence_survive_a_restart_and_either_of_two_workers_answers_from_every_partition(
    kafka: LocalKafka, models_dir: Path, tmp_path: Path
) -> None:
    pipeline = Pipeline(
        kafka.config.bootstrap,
        models_dir,
        tmp_path / "first",
        topic_partitions=4,
        http_port=free_port(),
        cooccurrence="on",  # the test model does not fuse it: counted all the same
    ).start()
    second: WorkerProcess | None = None
    try:
        pipeline.publish_catalog()
        items = [item.item_id for item in pipeline.workload.catalog[:5]]
        start = now_ms()
        # Item i is viewed 12 - 2i times, by users spread over every partition.
        crowd = [
            Publisher.event(f"crowd-{n}", item, "view", ts=start, event_id=f"crowd-{item}-{n}")
            for i, item in enumerate(items)
            for n in range(12 - 2 * i)
        ]
        pipeline.send_events(crowd)
        pipeline.collect_until(lambda out: {e.event_id for e in crowd} <= out.covered_event_ids(), timeout_s=60)
        port = pipeline.settings.http_port
        assert http_text(port, "/console")[0] == 404  # the console is off unless RTREC_CONSOLE=1
        # Every view at the same event time: item i scores (12 - 2i) / 12 of the first, counted over every
        # partition (a worker's own partitions alone would give other shares).
        expected = [(item, round((12 - 2 * i) / 12, 4)) for i, item in enumerate(items)]
        assert _ranked(port) == expected
        # Walkers go from item A to item B (six of them) or C (three): what people reach next after A.
        a, b, c = (item.item_id for item in pipeline.workload.catalog[5:8])
        walks = [
            Publisher.event(f"walker-{n}", item, "view", ts=start + 1000 * step, event_id=f"walk-{n}-{step}")
            for n in range(9)
            for step, item in enumerate((a, b if n < 6 else c))
        ]
        pipeline.send_events(walks)
        pipeline.collect_until(lambda out: {e.event_id for e in walks} <= out.covered_event_ids(), timeout_s=60)
        next_after = _ranked(port, f"/items/{a}/together?k=3")
        assert [item for item, _ in next_after] == [b, c] and next_after[0][1] > next_after[1][1]
        expected = _ranked(port)  # the walkers count too
        time.sleep(TRENDING_SNAPSHOT_S * 2)  # a snapshot of every partition is written, and the changed rows

        pipeline.restart_worker()  # nothing new arrives: only the snapshots can bring the counts back
        assert _eventually(lambda: _ranked(port) == expected)
        assert _eventually(lambda: _ranked(port, f"/items/{a}/together?k=3") == next_after)
        status, body = http_get(port, "/users/newcomer-1/recommendations?k=2&fallback=trending")
        assert status == 200 and [i["item_id"] for i in body["items"]] == [item for item, _ in expected[:2]]

        # A second worker joins: each owns some partitions, and either answers from all of them.
        second_settings = dataclasses.replace(pipeline.settings, home=tmp_path / "second", http_port=free_port())
        second = WorkerProcess(second_settings, tmp_path / "second.log")
        assert pipeline.worker is not None
        wait_group_ready([pipeline.worker, second])
        owned = _eventually(lambda: _partitions_split(port, second_settings.http_port))
        assert len(owned) == 2
        for worker_port in (port, second_settings.http_port):
            assert _eventually(lambda p=worker_port: _ranked(p) == expected)  # type: ignore[misc]
    finally:
        if second is not None:
            second.stop()
        pipeline.stop()


def _partitions_split(*ports: int) -> list[list[int]] | None:
    """Each worker's owned partitions, once each owns some and together they hold each exactly once."""
    owned = [http_get(port, "/trending/partial?depth=10")[1]["partitions"] for port in ports]
    split = all(owned) and sorted(p for parts in owned for p in parts) == [0, 1, 2, 3]
    return owned if split else None
