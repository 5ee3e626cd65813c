from pathlib import Path

import numpy as np

from streams.item_titles import MAX_TITLE_CHARS, ItemTitles
from streams.ports import VectorPoint
from streams.stores.edge import EdgeVectorStore


def _store(tmp_path: Path, titles: dict[str, object]) -> EdgeVectorStore:
    store = EdgeVectorStore(tmp_path / "q")
    store.ensure_collection("items", 2)
    store.upsert("items", [VectorPoint(i, np.ones(2, dtype=np.float32), {"title": t}) for i, t in titles.items()])
    return store


def test_titles_come_from_the_payloads_shortened_to_one_line_and_missing_ones_are_absent(tmp_path: Path) -> None:
    store = _store(tmp_path, {"a": "Heat\n (1995)", "b": "x" * 500, "c": 7})
    titles = ItemTitles(store, lambda: "items", capacity=10, ttl_s=60)
    found = titles.of(["a", "b", "c", "gone"])
    assert found["a"] == "Heat (1995)"
    assert len(found["b"]) == MAX_TITLE_CHARS and found["b"].endswith("…")
    assert "c" not in found and "gone" not in found


def test_a_changed_title_is_seen_after_the_time_limit_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    now = [0.0]
    store = _store(tmp_path, {str(n): f"t{n}" for n in range(20)})
    titles = ItemTitles(store, lambda: "items", capacity=8, ttl_s=10, clock=lambda: now[0])
    assert titles.of(["1"]) == {"1": "t1"}
    store.upsert("items", [VectorPoint("1", np.ones(2, dtype=np.float32), {"title": "renamed"})])
    assert titles.of(["1"]) == {"1": "t1"}  # cached
    now[0] = 11
    assert titles.of(["1"]) == {"1": "renamed"}
    titles.of([str(n) for n in range(20)])
    assert len(titles._titles) <= 20 // 2 + 1
