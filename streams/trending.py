"""What is popular right now, kept in-stream: the cold-start list for users with no history.

Every event a worker adds to a window counts for its item, with a weight that halves
every ``half_life_s`` of event time, so the ranking follows what people do now and
forgets what they did yesterday. Counts are kept as log-scores relative to a fixed
origin (no rescaling pass as time moves), and the least popular items leave once
more than ``capacity`` are tracked.

Each worker counts the events of its own partitions: users are spread over partitions
by hash, so every worker's list is a fair sample of everyone's.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from streams.records import Event


class Trending:
    def __init__(self, half_life_s: float = 3600.0, capacity: int = 50_000) -> None:
        if half_life_s <= 0 or capacity < 1:
            raise ValueError("half_life_s must be > 0 and capacity >= 1")
        self._rate = math.log(2) / (half_life_s * 1000)  # per millisecond of event time
        self.capacity = capacity
        self._log_score: dict[str, float] = {}  # log of the decayed count, measured at time 0
        self._lock = threading.Lock()  # the events agent writes while HTTP requests read

    def add(self, events: Iterable[Event]) -> None:
        with self._lock:
            for event in events:
                grown = self._rate * event.ts  # log of this event's weight at time 0
                held = self._log_score.get(event.item_id)
                self._log_score[event.item_id] = grown if held is None else _log_add(held, grown)
            if len(self._log_score) > self.capacity * 1.2:  # trim in bulk, not on every event
                kept = sorted(self._log_score.items(), key=lambda kv: -kv[1])[: self.capacity]
                self._log_score = dict(kept)

    def top(self, n: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The ``n`` most popular items now, with their scores relative to the first (1.0)."""
        skip = set(exclude)
        with self._lock:
            ranked = sorted(((s, i) for i, s in self._log_score.items() if i not in skip), reverse=True)[:n]
        if not ranked:
            return []
        best = ranked[0][0]
        return [(item_id, math.exp(score - best)) for score, item_id in ranked]

    def __len__(self) -> int:
        return len(self._log_score)


def _log_add(a: float, b: float) -> float:
    high, low = (a, b) if a >= b else (b, a)
    return high + math.log1p(math.exp(low - high))
