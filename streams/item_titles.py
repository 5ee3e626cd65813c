"""Item titles for the reasons a list gives, cached in front of the vector store.

A reason names the window events an item was recommended for ("because you rated Heat (1995)");
the titles live in the items' payloads. Only the items a batch's reasons name are looked up, and
the misses in one call, so a batch costs a dictionary look-up per named item. Titles changed in the
catalogue are seen within ``ttl_s``; an item without a title (or no longer in the catalogue) is
named by its id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from streams.ports import VectorStore

MAX_TITLE_CHARS = 80  # a reason stays a line; the full title is one fetch away for whoever needs it


class ItemTitles:
    def __init__(
        self,
        store: VectorStore,
        collection: Callable[[], str],
        *,
        capacity: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.collection = collection  # the served items collection (it changes with a model swap)
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        self._titles: dict[str, tuple[str, float]] = {}  # item id → (title or "", when it was fetched)

    def of(self, item_ids: Iterable[str]) -> dict[str, str]:
        """The title of each id that has one (shortened to a line); ids without a title are absent."""
        now = self.clock()
        wanted = set(item_ids)
        cached = {i: self._titles[i] for i in wanted if i in self._titles}
        missing = [i for i in wanted if i not in cached or now - cached[i][1] >= self.ttl_s]
        if missing:
            payloads = self.store.fetch_payloads(self.collection(), missing, ["title"])
            for item_id in missing:
                title = (payloads.get(item_id) or {}).get("title")
                cached[item_id] = (_one_line(title) if isinstance(title, str) else "", now)
            self._keep({i: cached[i] for i in missing})
        return {item_id: title for item_id, (title, _) in cached.items() if title}

    def _keep(self, fetched: dict[str, tuple[str, float]]) -> None:
        self._titles.update(fetched)
        if len(self._titles) > self.capacity:  # the oldest fetched half leaves (dicts keep insertion order)
            for item_id in list(self._titles)[: len(self._titles) // 2]:
                del self._titles[item_id]


def _one_line(title: str) -> str:
    line = " ".join(title.split())
    return line if len(line) <= MAX_TITLE_CHARS else line[: MAX_TITLE_CHARS - 1].rstrip() + "…"
