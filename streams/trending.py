"""What is popular right now, kept in-stream: the cold-start list for users with no history.

Every event a worker adds to a window counts for its item, with a weight that halves
every ``half_life_s`` of event time, so the ranking follows what people do now and
forgets what they did yesterday. Counts are kept as log-scores relative to a fixed
origin (no rescaling pass as time moves), and the least popular items leave once
more than ``capacity`` are tracked.

Counts are kept per events partition (``PartitionedTrending``): a worker counts the events
of the partitions it owns, keeps a snapshot of each in a changelogged table (so a restarted
worker, or the next owner after a rebalance, starts from it), and the list merges every
partition's counts, its own and those other workers report.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from streams.errors import InvalidRecord
from streams.ports import ItemFilter
from streams.records import Event

SNAPSHOT_VERSION = 1
SNAPSHOT_DEPTH = 2_000  # items a partition's snapshot keeps: far more than a list looks at

LogScores = Sequence[tuple[str, float]]  # (item id, log of its decayed count at time 0), most popular first


class Trending:
    def __init__(self, half_life_s: float = 3600.0, capacity: int = 50_000) -> None:
        if half_life_s <= 0 or capacity < 1:
            raise ValueError("half_life_s must be > 0 and capacity >= 1")
        self._rate = math.log(2) / (half_life_s * 1000)  # per millisecond of event time
        self.capacity = capacity
        self._log_score: dict[str, float] = {}  # log of the decayed count, measured at time 0
        self._lock = threading.Lock()  # the events agent writes while HTTP requests read
        self.changes = 0  # how many times the counts changed: a snapshot is due when this moved

    def add(self, events: Iterable[Event]) -> None:
        with self._lock:
            self.changes += 1
            for event in events:
                grown = self._rate * event.ts  # log of this event's weight at time 0
                held = self._log_score.get(event.item_id)
                self._log_score[event.item_id] = grown if held is None else _log_add(held, grown)
            if len(self._log_score) > self.capacity * 1.2:  # trim in bulk, not on every event
                kept = sorted(self._log_score.items(), key=lambda kv: -kv[1])[: self.capacity]
                self._log_score = dict(kept)

    def top(self, n: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The ``n`` most popular items now, with their scores relative to the first (1.0)."""
        return relative(self.log_scores(), n, exclude)

    def log_scores(self, depth: int | None = None) -> LogScores:
        """The counts, most popular first (ties by item id); the first ``depth`` of them when given."""
        with self._lock:
            item_ids = list(self._log_score)
            scores = np.fromiter(self._log_score.values(), dtype=np.float64, count=len(item_ids))
        if depth is not None and depth < len(item_ids):
            # The snapshot's cut runs every few seconds beside the events: selected in numpy, so that only
            # the kept items (and those tied with the last of them) are sorted while holding the interpreter.
            cut = np.partition(scores, len(scores) - depth)[len(scores) - depth] if depth > 0 else np.inf
            kept = np.flatnonzero(scores >= cut)
            return _ranked([(item_ids[i], float(scores[i])) for i in kept])[:depth]
        return _ranked(list(zip(item_ids, scores.tolist(), strict=True)))

    def merge(self, scores: LogScores) -> None:
        """Add counts kept elsewhere (a snapshot, another partition's) to these."""
        with self._lock:
            self.changes += 1
            for item_id, score in scores:
                held = self._log_score.get(item_id)
                self._log_score[item_id] = score if held is None else _log_add(held, score)

    def to_bytes(self, depth: int = SNAPSHOT_DEPTH) -> bytes:
        return msgpack.packb({"v": SNAPSHOT_VERSION, "scores": [list(pair) for pair in self.log_scores(depth)]})

    @staticmethod
    def scores_from_bytes(raw: bytes) -> LogScores:
        """The scores of a snapshot (``to_bytes``); ``InvalidRecord`` for anything else."""
        try:
            snapshot = msgpack.unpackb(raw)
            if not isinstance(snapshot, dict) or snapshot.get("v") != SNAPSHOT_VERSION:
                raise InvalidRecord(f"not a version-{SNAPSHOT_VERSION} trending snapshot", "v")
            return [(str(item_id), float(score)) for item_id, score in snapshot["scores"]]
        except (ValueError, TypeError, KeyError, msgpack.ExtraData) as exc:
            raise InvalidRecord(f"unreadable trending snapshot ({exc})", "scores") from None

    def __len__(self) -> int:
        return len(self._log_score)


class PartitionedTrending:
    """One ``Trending`` per events partition a worker owns."""

    def __init__(self, half_life_s: float = 3600.0, capacity: int = 50_000) -> None:
        self.half_life_s, self.capacity = half_life_s, capacity
        self._partitions: dict[int, Trending] = {}
        self._lock = threading.Lock()

    def partition(self, partition: int) -> Trending:
        with self._lock:
            if partition not in self._partitions:
                self._partitions[partition] = Trending(self.half_life_s, self.capacity)
            return self._partitions[partition]

    def add(self, events_by_partition: Mapping[int, Iterable[Event]]) -> None:
        for partition, events in events_by_partition.items():
            self.partition(partition).add(events)

    def owned(self) -> list[int]:
        with self._lock:
            return sorted(self._partitions)

    def drop(self, partition: int) -> None:
        """A partition another worker owns now: its counts go on there."""
        with self._lock:
            self._partitions.pop(partition, None)

    def log_scores(self, depth: int | None = None) -> LogScores:
        """Every owned partition's counts merged."""
        merged = merge(self._each_partitions_scores())
        return merged[:depth] if depth is not None else merged

    def top(self, n: int, exclude: Iterable[str] = (), elsewhere: Iterable[LogScores] = ()) -> list[tuple[str, float]]:
        """The ``n`` most popular items over the owned partitions and the counts ``elsewhere`` (other
        workers' partitions), scored relative to the first (1.0)."""
        return relative(merge([*self._each_partitions_scores(), *elsewhere]), n, exclude)

    def _each_partitions_scores(self) -> list[LogScores]:
        with self._lock:
            parts = list(self._partitions.values())
        return [part.log_scores() for part in parts]


def merge(lists: Iterable[LogScores]) -> LogScores:
    """Counts of several partitions added up, most popular first."""
    total: dict[str, float] = {}
    for scores in lists:
        for item_id, score in scores:
            held = total.get(item_id)
            total[item_id] = score if held is None else _log_add(held, score)
    return _ranked(list(total.items()))


def _ranked(scores: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(scores, key=lambda kv: (-kv[1], kv[0]))


def relative(scores: LogScores, n: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
    skip = set(exclude)
    ranked = [(item_id, score) for item_id, score in scores if item_id not in skip][:n]
    if not ranked:
        return []
    best = ranked[0][1]
    return [(item_id, math.exp(score - best)) for item_id, score in ranked]


SHOWN_FIELDS = ("category", "price", "available")  # the payload fields ``shown_popular`` reads
POPULAR_REASON = "popular right now"


def shown_popular(
    ranked: Sequence[tuple[str, float]],
    payloads: Mapping[str, Mapping[str, Any]],
    rules: ItemFilter | None,
    k: int,
    exclude: Iterable[str] = (),
) -> list[tuple[str, float]]:
    """The first ``k`` of the most popular items that a list may show: still in the catalogue (a payload),
    available, admitted by the rules and not excluded (e.g. already in the user's window)."""
    skip = set(exclude)
    shown = []
    for item_id, score in ranked:
        payload = payloads.get(item_id)  # None: deleted from the catalogue
        if payload is None or payload.get("available") is False or item_id in skip:
            continue
        if rules and not rules.admits(payload):
            continue
        shown.append((item_id, score))
        if len(shown) == k:
            break
    return shown


def _log_add(a: float, b: float) -> float:
    high, low = (a, b) if a >= b else (b, a)
    return high + math.log1p(math.exp(low - high))
