"""One contract suite for every VectorStore implementation.

Embedded Qdrant always runs, with and without the retrying wrapper the worker wraps every store in,
and so does the server adapter over qdrant-client's in-memory engine, and a real Qdrant server: the
session's local one (``infra.qdrant_local``; skipped, saying how to get one, where there is no binary),
or the one PYTEST_QDRANT_URL points at (e.g. `docker compose up qdrant`, then
PYTEST_QDRANT_URL=http://localhost:6333).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from qdrant_client import QdrantClient

from infra.qdrant_local import LocalQdrant
from streams.errors import VectorStoreError
from streams.metrics import WorkerMetrics
from streams.ports import ItemFilter, SearchHit, SearchQuery, VectorPoint, VectorStore
from streams.settings import Settings
from streams.stores.edge import EdgeVectorStore, HitFields
from streams.stores.native_index import BUILD_CHUNK
from streams.stores.retry import RetryingVectorStore
from streams.stores.server import QdrantVectorStore
from streams.worker.app import open_vector_store

DIM = 8
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StoreUnderTest:
    store: VectorStore
    name: str  # a collection of DIM-d vectors, fresh for each test


class _NativeSearched(EdgeVectorStore):
    """Embedded Qdrant searched through its native index from the first point on: each search waits for
    the index, which a worker builds in the background (and meanwhile searches through Qdrant)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, native_from=1)
        self.written: set[str] = set()

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        super().upsert(collection, points)
        self.written.add(collection)

    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        assert self.native_ready(collection, timeout_s=30) or collection not in self.written
        return super().search_batch(collection, queries)


@pytest.fixture(params=["embedded", "embedded-native", "retrying-embedded", "server-adapter", "server", "server-grpc"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    name = f"items-{uuid.uuid4().hex[:8]}"
    if request.param == "embedded-native":
        native = _NativeSearched(tmp_path)
        native.ensure_collection(name, DIM)
        yield StoreUnderTest(native, name)
        native.close()
        return
    if request.param == "server-adapter":
        # The server adapter's code (filters, ids, payloads) over qdrant-client's in-memory engine.
        adapter = QdrantVectorStore(QdrantClient(location=":memory:"))
        adapter.ensure_collection(name, DIM)
        yield StoreUnderTest(adapter, name)
        adapter.close()
        return
    if request.param == "retrying-embedded":
        # What the worker is wired with: the outage-retrying wrapper, over the embedded store.
        inner = open_vector_store(Settings(home=tmp_path, items_collection=name))
        retrying = RetryingVectorStore(inner, WorkerMetrics())
        retrying.ensure_collection(name, DIM)
        yield StoreUnderTest(retrying, name)
        retrying.close()
        return
    if request.param == "server":
        # A server of the user's own (PYTEST_QDRANT_URL), else the session's local Qdrant server.
        url = os.environ.get("PYTEST_QDRANT_URL") or request.getfixturevalue("qdrant_server").config.url
        settings = Settings(qdrant_url=url, items_collection=name)
    elif request.param == "server-grpc":  # the local server again, every call over gRPC
        config = request.getfixturevalue("qdrant_server").config
        settings = Settings(qdrant_url=config.url, qdrant_grpc_port=config.grpc, items_collection=name)
    else:
        settings = Settings(home=tmp_path, items_collection=name)
    opened = open_vector_store(settings)
    opened.ensure_collection(settings.items_collection, DIM)
    yield StoreUnderTest(opened, settings.items_collection)
    opened.close()


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _points(n: int) -> list[VectorPoint]:
    return [VectorPoint(f"item-{i}", _unit(i), {"available": True, "title": f"t{i}"}) for i in range(n)]


def test_upsert_fetch_and_delete_by_external_id(subject: StoreUnderTest) -> None:
    store, name = subject.store, subject.name
    store.upsert(name, _points(5))
    fetched = store.fetch_vectors(name, ["item-1", "item-3", "item-3", "nope"])
    assert set(fetched) == {"item-1", "item-3"}
    np.testing.assert_allclose(fetched["item-1"], _unit(1), atol=1e-6)
    store.delete(name, ["item-1"])
    assert set(store.fetch_vectors(name, ["item-1", "item-3"])) == {"item-3"}


def _stored_with_one_unavailable(subject: StoreUnderTest, n: int, unavailable: int) -> list[VectorPoint]:
    points = _points(n)
    points[unavailable] = VectorPoint(f"item-{unavailable}", _unit(unavailable), {"available": False})
    subject.store.upsert(subject.name, points)
    return points


def test_search_ranks_by_cosine_and_honours_exclusions(subject: StoreUnderTest) -> None:
    store, name = subject.store, subject.name
    points = _stored_with_one_unavailable(subject, 40, 7)
    query = _unit(3)
    expected = sorted(
        (p.id for p in points if p.id not in {"item-3", "item-7"}), key=lambda i: -float(_unit(int(i[5:])) @ query)
    )
    hits = store.search_batch(name, [SearchQuery(query, limit=5, exclude_ids=["item-3"])])[0]
    assert [h.id for h in hits] == expected[:5]
    assert hits[0].score == pytest.approx(float(_unit(int(expected[0][5:])) @ query), abs=1e-5)
    everything = store.search_batch(name, [SearchQuery(query, limit=40, exclude_ids=["item-3"])])[0]
    assert "item-7" not in {h.id for h in everything} and len(everything) == 38  # unavailable is never returned
    with_unavailable = store.search_batch(name, [SearchQuery(query, limit=40, only_available=False)])[0]
    assert "item-7" in {h.id for h in with_unavailable}


def test_a_search_among_given_ids_ranks_those_alone_with_every_other_rule(subject: StoreUnderTest) -> None:
    store, name = subject.store, subject.name
    _stored_with_one_unavailable(subject, 30, 4)
    query = _unit(0)
    among = ["item-2", "item-4", "item-9", "item-17", "item-21", "unknown"]
    hits = store.search_batch(name, [SearchQuery(query, limit=10, exclude_ids=["item-9"], only_ids=among)])[0]
    expected = sorted(["item-2", "item-17", "item-21"], key=lambda i: -float(_unit(int(i[5:])) @ query))
    assert [h.id for h in hits] == expected  # not excluded, available, known: exact scores, best first
    assert [h.score for h in hits] == pytest.approx([float(_unit(int(i[5:])) @ query) for i in expected], abs=1e-5)
    assert store.search_batch(name, [SearchQuery(query, limit=3, only_ids=[])])[0] == []


def test_a_search_after_a_write_sees_the_write(subject: StoreUnderTest) -> None:
    """The embedded store keeps hits' ranking fields between searches; a write must still show at once."""
    store, name = subject.store, subject.name
    store.upsert(name, _points(20))
    query = SearchQuery(_unit(3), limit=3, only_available=False)
    first = store.search_batch(name, [query])[0]
    assert first[0].id == "item-3" and first[0].payload["available"] is True
    store.upsert(name, [VectorPoint("item-3", _unit(3), {"available": False, "ts": 42})])
    store.delete(name, [first[1].id])
    second = store.search_batch(name, [query])[0]
    assert second[0].id == "item-3" and second[0].payload["available"] is False and second[0].payload["ts"] == 42
    assert first[1].id not in {h.id for h in second}
    assert "item-3" not in {h.id for h in store.search_batch(name, [SearchQuery(_unit(3), limit=3)])[0]}


class _ShardWrittenDuringFetch:
    """A shard whose payload read overlaps a write of the same points (the catalogue thread's)."""

    def __init__(self, fields: HitFields) -> None:
        self.fields = fields
        self.reads = 0

    def retrieve(self, ids: Sequence[int], **_: object) -> list[SimpleNamespace]:
        self.reads += 1
        if self.reads == 1:
            self.fields.written(ids)  # the write lands while the old fields are being read
        return [SimpleNamespace(id=i, payload={"ext_id": f"item-{i}", "available": True}) for i in ids]


def test_hit_fields_read_during_a_write_serve_their_search_but_are_not_kept() -> None:
    fields = HitFields(capacity=10)
    shard = _ShardWrittenDuringFetch(fields)
    found = [[(1, 0.5), (2, 0.4)]]
    for reads in (1, 2, 2):  # not kept after the overlapping read; kept after the next one
        hits = fields.hits(cast(Any, shard), found)[0]
        assert [h.id for h in hits] == ["item-1", "item-2"] and shard.reads == reads
    fields.written([1])
    assert [h.id for h in fields.hits(cast(Any, shard), found)[0]] == ["item-1", "item-2"]
    assert shard.reads == 3  # the written point is read again, the other one is not


def test_exclusions_larger_than_the_first_fetch_still_fill_the_list(subject: StoreUnderTest) -> None:
    store, name = subject.store, subject.name
    points = _points(60)
    for i in range(0, 30):  # many unavailable items near the query force a second, larger fetch
        points[i] = VectorPoint(points[i].id, points[i].vector, {"available": False})
    store.upsert(name, points)
    hits = store.search_batch(name, [SearchQuery(_unit(0), limit=10, exclude_ids=["item-31"])])[0]
    assert len(hits) == 10
    assert all(int(h.id[5:]) >= 30 and h.id != "item-31" for h in hits)


def test_item_filters_keep_only_matching_categories_and_prices(subject: StoreUnderTest) -> None:
    store, name = subject.store, subject.name
    categories = ("books", "music", "garden")
    points = [
        VectorPoint(
            f"item-{i}",
            _unit(i),
            {"available": True, "category": categories[i % 3], "price": None if i % 5 == 0 else float(i)},
        )
        for i in range(60)
    ]
    store.upsert(name, points)
    payload = {p.id: p.payload for p in points}

    def search(rules: ItemFilter) -> list[str]:
        query = SearchQuery(_unit(99), limit=60, exclude_ids=["item-1"], item_filter=rules)
        found = [h.id for h in store.search_batch(name, [query])[0]]
        # The filter's own reading of a payload (trending lists use it) agrees with the store's.
        assert set(found) == {i for i in payload if i != "item-1" and rules.admits(payload[i])}
        return found

    music = search(ItemFilter(categories=("music",)))
    assert music and all(payload[i]["category"] == "music" for i in music) and "item-1" not in music
    assert len(music) == 20 - 1  # every music item but the excluded one
    not_books = search(ItemFilter(exclude_categories=("books", "garden")))
    assert set(not_books) == set(music)
    priced = search(ItemFilter(min_price=10, max_price=20))
    assert sorted(int(i[5:]) for i in priced) == [i for i in range(10, 21) if i % 5 != 0]
    assert search(ItemFilter(categories=("music",), max_price=12)) == [
        i for i in music if payload[i]["price"] is not None and payload[i]["price"] <= 12
    ]


def test_a_collection_of_another_dimension_is_refused(subject: StoreUnderTest) -> None:
    with pytest.raises(VectorStoreError, match=f"holds {DIM}-d vectors ranked by Dot; the model makes 16-d"):
        subject.store.ensure_collection(subject.name, 16)


def test_a_dropped_collection_is_gone_and_can_be_made_anew_with_another_dimension(subject: StoreUnderTest) -> None:
    store, name = subject.store, subject.name
    store.upsert(name, _points(3))
    store.drop_collection(name)
    store.drop_collection(name)  # a missing one is no error
    store.ensure_collection(name, 16)  # what the old one held binds nothing
    assert store.fetch_vectors(name, ["item-1"]) == {}


def test_embedded_store_keeps_its_points_across_reopen_and_refuses_another_model(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path)
    store.ensure_collection("items", DIM)
    store.upsert("items", _points(30))
    # One owner of a folder at a time: another waits for the lock (up to lock_wait_s), then says why it gave up.
    with pytest.raises(VectorStoreError, match="stayed locked by another process for 1 s: each worker needs its own"):
        EdgeVectorStore(tmp_path, lock_wait_s=1).ensure_collection("items", DIM)
    waiting = EdgeVectorStore(tmp_path, lock_wait_s=60)
    threading.Timer(1.0, store.close).start()  # say, a worker that was still shutting down
    started = time.monotonic()
    waiting.ensure_collection("items", DIM)
    assert time.monotonic() - started >= 0.9 and len(waiting.fetch_vectors("items", ["item-1", "item-2"])) == 2
    waiting.close()

    reopened = EdgeVectorStore(tmp_path)
    reopened.ensure_collection("items", DIM)
    before = reopened.search_batch("items", [SearchQuery(_unit(2), limit=5)])[0]
    assert before[0].id == "item-2"
    reopened.build_index("items")
    assert reopened.search_batch("items", [SearchQuery(_unit(2), limit=5)])[0] == before
    reopened.close()

    with pytest.raises(VectorStoreError, match=f"holds {DIM}-d vectors; the model makes 16-d vectors ranked by Dot"):
        EdgeVectorStore(tmp_path).ensure_collection("items", 16)


class _FlakyStore(EdgeVectorStore):
    """An embedded store whose searches fail ``failures`` times before the store answers again."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def search_batch(self, collection: str, queries: Sequence[SearchQuery]) -> list[list[SearchHit]]:
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("store down")
        return super().search_batch(collection, queries)


def test_an_outage_is_ridden_out_with_backoff_and_counted(tmp_path: Path) -> None:
    metrics = WorkerMetrics()
    flaky = _FlakyStore(tmp_path, failures=3)
    store = RetryingVectorStore(flaky, metrics, first_backoff_s=0.01, max_backoff_s=0.02)
    store.ensure_collection("items", DIM)
    store.upsert("items", _points(5))
    hits = store.search_batch("items", [SearchQuery(_unit(2), limit=1)])
    assert [h.id for h in hits[0]] == ["item-2"]  # the answer once the store is back
    assert metrics.store_errors.labels("search")._value.get() == 3


def test_a_stopping_worker_abandons_a_retry(tmp_path: Path) -> None:
    store = RetryingVectorStore(_FlakyStore(tmp_path, failures=10**6), WorkerMetrics(), first_backoff_s=0.05)
    store.ensure_collection("items", DIM)
    stopper = threading.Timer(0.3, store.stop_retrying)
    stopper.start()
    with pytest.raises(VectorStoreError, match="abandoned: the worker is stopping"):
        store.search_batch("items", [SearchQuery(_unit(2), limit=1)])


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_workers_starting_together_on_one_server_all_open_the_collection(
    qdrant_server: LocalQdrant, transport: str
) -> None:
    """Every worker finds the collection missing and creates it: all but one are refused (409), and must
    carry on with the one the first made (two workers of the bench crashed so before)."""
    config = qdrant_server.config
    settings = Settings(qdrant_url=config.url, qdrant_grpc_port=config.grpc if transport == "grpc" else 0)
    name = f"race-{uuid.uuid4().hex[:8]}"
    stores = [open_vector_store(settings) for _ in range(6)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def open_it(store: VectorStore) -> None:
        start.wait()
        try:
            store.ensure_collection(name, DIM)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_it, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert not errors, errors


def test_the_native_index_keeps_every_write_made_while_it_is_built(tmp_path: Path) -> None:
    """Points written and deleted while the index is read from the shard, chunk by chunk, are searched as
    they stand afterwards: replaced vectors at their new scores, deleted points never."""
    store = EdgeVectorStore(tmp_path, native_from=1)
    store.ensure_collection("items", DIM)
    count = 3 * BUILD_CHUNK
    store.upsert("items", _points(count))
    assert store.native_ready("items", timeout_s=0) is False  # started, not built yet
    moved = [VectorPoint(f"item-{i}", _unit(count + i), {"available": True}) for i in range(0, count, 7)]
    deleted = [f"item-{i}" for i in range(3, count, 11)]
    store.upsert("items", moved)
    store.delete("items", deleted)
    assert store.native_ready("items", timeout_s=60)
    vectors = {p.id: p.vector for p in _points(count)} | {p.id: p.vector for p in moved}
    for gone in deleted:
        vectors.pop(gone)
    ids = list(vectors)
    matrix = np.stack([vectors[i] for i in ids])
    for seed in range(20):
        query = _unit(10_000 + seed)
        hits = store.search_batch("items", [SearchQuery(query, limit=10)])[0]
        exact = [ids[i] for i in np.argsort(-(matrix @ query))[:10]]
        assert len(set(h.id for h in hits) & set(exact)) >= 9  # approximate, but over the points as they stand
        assert all(h.id in vectors and h.score == pytest.approx(float(vectors[h.id] @ query), abs=1e-5) for h in hits)
    store.close()


def test_searches_with_business_rules_stay_with_qdrant_and_keep_them(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path, native_from=1)
    store.ensure_collection("items", DIM)
    store.upsert("items", [VectorPoint(f"item-{i}", _unit(i), {"category": "a" if i % 2 else "b"}) for i in range(50)])
    assert store.native_ready("items", timeout_s=30)
    rules = ItemFilter(categories=("a",))
    both = store.search_batch(
        "items", [SearchQuery(_unit(4), limit=5, item_filter=rules), SearchQuery(_unit(4), limit=5)]
    )
    assert all(int(h.id[5:]) % 2 for h in both[0]) and len(both[0]) == 5
    assert both[1][0].id == "item-4"
    store.close()


def test_the_embedded_store_loads_with_onnx_runtime_in_either_order() -> None:
    """usearch's extension loaded before ONNX Runtime's crashed the process; the store's module sees to it."""
    for first, second in (("streams.stores.edge", "onnxruntime"), ("onnxruntime", "streams.stores.edge")):
        ran = subprocess.run([sys.executable, "-c", f"import {first}, {second}"], cwd=ROOT, capture_output=True)
        assert ran.returncode == 0, (first, second, ran.stderr[-2000:])
