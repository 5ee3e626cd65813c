"""What both Qdrant adapters share: point ids, the payload they rank with, and the
over-fetch that keeps unavailable items out of a list without a payload filter.

Availability is checked on the hits rather than in the search filter because a
filter that mixes excluded ids with a payload condition is slow in the Qdrant
engine (measured: tens of queries/s at 100k points, against thousands for the
id exclusion alone); unavailable items are few, so one over-fetch nearly always
suffices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from streams.ports import SearchHit, SearchQuery

EXTERNAL_ID = "ext_id"
RANKING_FIELDS = [EXTERNAL_ID, "available", "ts"]  # all a ranking reads from a hit's payload (ts: freshness)
OVERFETCH = 8  # extra hits per query, for unavailable items among the nearest


def point_id(external_id: str) -> int:
    """Qdrant ids are unsigned 64-bit ints or UUIDs: external string ids map to 64 bits of their hash.

    Ints, not UUIDs: excluding a window's ~50 items from a search costs ~60 µs with int
    ids against ~180-490 µs with UUID strings (measured at 100k items), and the search
    itself is faster too. Two ids of a catalogue of n items share a point with odds of
    n²/2⁶⁵ (3e-8 at a million items).
    """
    return int.from_bytes(hashlib.blake2b(external_id.encode("utf-8"), digest_size=8).digest(), "little")


_KNOWN_POINT_IDS: dict[str, int] = {}
KNOWN_POINT_IDS_CAPACITY = 1 << 20


def point_ids(external_ids: Iterable[str]) -> list[int]:
    """``point_id`` of each, remembered: every search excludes its window's ~50 items, mostly the same ones
    batch after batch (a dict read is a third of an ``lru_cache`` call's cost, measured: 15 against 50 µs
    for a window)."""
    ids = list(external_ids)
    found = list(map(_KNOWN_POINT_IDS.get, ids))
    if None not in found:
        return cast(list[int], found)
    if len(_KNOWN_POINT_IDS) > KNOWN_POINT_IDS_CAPACITY:
        _KNOWN_POINT_IDS.clear()
    for i, (external_id, known) in enumerate(zip(ids, found, strict=True)):
        if known is None:
            found[i] = _KNOWN_POINT_IDS[external_id] = point_id(external_id)
    return cast(list[int], found)


def unavailable(hit: SearchHit) -> bool:
    return hit.payload.get("available") is False


def rank_without_unavailable(
    queries: Sequence[SearchQuery],
    fetch: Callable[[Sequence[tuple[SearchQuery, int]]], list[list[SearchHit]]],
) -> list[list[SearchHit]]:
    """``fetch`` runs (query, limit) pairs as one batch, honouring each query's excluded ids.

    Queries left short by unavailable hits are fetched again, twice as deep, until
    full or until the collection has no more to give.
    """
    limits = [q.limit + (OVERFETCH if q.only_available else 0) for q in queries]
    results: list[list[SearchHit]] = [[] for _ in queries]
    pending = list(range(len(queries)))
    while pending:
        fetched = fetch([(queries[i], limits[i]) for i in pending])
        still_short = []
        for i, hits in zip(pending, fetched, strict=True):
            query = queries[i]
            kept = [h for h in hits if not (query.only_available and unavailable(h))]
            results[i] = kept[: query.limit]
            if len(kept) < query.limit and len(hits) == limits[i]:
                limits[i] *= 2
                still_short.append(i)
        pending = still_short
    return results
