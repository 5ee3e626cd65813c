"""Which items go together, learned from the event stream as it flows: the long tail's signal.

An item that a user reaches right after another (within ``span`` steps of their window) is
counted as that item's neighbour, with weight ``1 / step``; the earlier item counts as the later
one's neighbour with half that (what follows says more than what precedes). Weights halve every
``half_life_s`` of event time (0: never), so pairs people stopped making fade. Neighbours are
cosine-normalised by how much each item co-occurs at all, and a user's score for an item sums
the neighbour rows of their ``newest`` items, each half as much as the one after it. A scoring
``damping`` above 0 divides each neighbour's weight by a further power of its total, which lifts
rarely seen items over popular ones (the fusion chooses it on validation targets, ``streams.fusion``).

That is item co-occurrence (item-kNN) as the offline baseline fits it (``encoder.baselines``),
kept live and bounded: each item keeps its ``neighbours`` heaviest neighbours, and at most
``capacity`` items are tracked (those that co-occur least leave first). The same class is fitted
offline by replaying training sequences through ``observe``, so what evaluation scores is what
the stream serves.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from streams.errors import InvalidRecord
from streams.records import REJECTION_TYPES, Event
from streams.state import UserWindow

SNAPSHOT_VERSION = 1
REBASE_EXPONENT = 40.0  # weights are kept relative to a time origin, moved before they overflow
TRIM_SLACK = 1.5  # a row is cut back to ``neighbours`` once it holds this many times as many


@dataclass(frozen=True)
class CooccurrenceSpec:
    """How co-occurrence is counted and scored (kept in a model bundle's manifest with its fusion)."""

    span: int = 3  # steps of a window within which two items count as co-occurring
    newest: int = 5  # a user's newest items whose neighbours are scored
    neighbours: int = 100  # neighbours kept per item
    half_life_s: float = 0.0  # event time over which a co-occurrence's weight halves; 0: no decay
    capacity: int = 50_000  # items tracked

    def __post_init__(self) -> None:
        if self.span < 1 or self.newest < 1 or self.neighbours < 1 or self.capacity < 1 or self.half_life_s < 0:
            raise ValueError(f"invalid co-occurrence spec {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CooccurrenceSpec:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown co-occurrence settings {sorted(unknown)}")
        spec = cls(**raw)
        return cls(int(spec.span), int(spec.newest), int(spec.neighbours), float(spec.half_life_s), int(spec.capacity))


class Cooccurrence:
    def __init__(self, spec: CooccurrenceSpec | None = None, track_changes: bool = True) -> None:
        self.spec = spec or CooccurrenceSpec()
        self.track_changes = track_changes  # for ``take_changed``: counts that are kept elsewhere
        self._rate = math.log(2) / (self.spec.half_life_s * 1000) if self.spec.half_life_s else 0.0
        self._origin_ms = 0  # weights are multiples of one event's weight at this time
        self._newest_ms = 0
        self._rows: dict[str, dict[str, float]] = {}  # item → neighbour → weight
        self._totals: dict[str, float] = {}  # item → every weight it took part in, trimmed neighbours included
        self._lock = threading.Lock()  # the events thread writes while HTTP requests read
        self.changed: dict[str, None] = {}  # items whose row changed since ``take_changed``, in that order

    def observe(self, before: Sequence[str], item_id: str, ts_ms: int) -> None:
        """``item_id`` happened at ``ts_ms`` after ``before`` (the user's previous items, newest last)."""
        with self._lock:
            unit = self._unit(ts_ms)
            for step, earlier in enumerate(reversed(before[-self.spec.span :]), start=1):
                if earlier == item_id:
                    continue
                weight = unit / step
                self._add(earlier, item_id, weight)
                self._add(item_id, earlier, 0.5 * weight)
            if len(self._totals) > self.spec.capacity * 1.2:  # trim in bulk, not on every event
                self._drop_least_connected()

    def scores(
        self, recent: Sequence[str], depth: int, exclude: Iterable[str] = (), damping: float = 0.0
    ) -> list[tuple[str, float, str]]:
        """The ``depth`` best items for a user whose newest items are ``recent`` (newest last):
        (item, score, the recent item that contributed most), best first; only items with a score.
        A neighbour's weight is divided by its total to the power ``0.5 + damping``."""
        exponent = 0.5 + damping
        skip = set(exclude)
        total: dict[str, float] = {}
        because: dict[str, tuple[float, str]] = {}
        with self._lock:
            smoothing = self._unit(self._newest_ms)
            newest = list(dict.fromkeys(reversed(recent)))[: self.spec.newest]  # newest first, each item once
            for age, anchor in enumerate(newest):
                row = self._rows.get(anchor)
                if not row:
                    continue
                share = 0.5**age / math.sqrt(self._totals[anchor] + smoothing)
                for neighbour, weight in row.items():
                    if neighbour in skip:
                        continue
                    part = share * weight / (self._totals.get(neighbour, 0.0) + smoothing) ** exponent
                    total[neighbour] = total.get(neighbour, 0.0) + part
                    if part > because.get(neighbour, (0.0, ""))[0]:
                        because[neighbour] = (part, anchor)
        best = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
        return [(item_id, score, because[item_id][1]) for item_id, score in best]

    def take_changed(self, limit: int | None = None) -> list[tuple[str, bytes]]:
        """The rows changed since they were last taken (at most ``limit``, those changed first first), each
        as a snapshot record (``row_from_bytes``)."""
        with self._lock:
            taken = list(itertools.islice(self.changed, limit))
            for item_id in taken:
                del self.changed[item_id]
            return [(item_id, self._row_bytes(item_id)) for item_id in taken]

    def rows(self) -> list[tuple[str, bytes]]:
        """Every row, as ``take_changed`` gives them."""
        with self._lock:
            return [(item_id, self._row_bytes(item_id)) for item_id in self._totals]

    def restore(self, rows: Iterable[tuple[str, bytes]]) -> None:
        """Merge rows written by ``take_changed`` (of this partition, by an earlier owner)."""
        with self._lock:
            for item_id, raw in rows:
                origin_ms, newest_ms, total, neighbours = row_from_bytes(raw)
                if self._rate and origin_ms > self._origin_ms:
                    self._rebase(origin_ms)
                scale = math.exp(self._rate * (origin_ms - self._origin_ms))  # 1 without decay
                self._newest_ms = max(self._newest_ms, newest_ms)
                self._totals[item_id] = self._totals.get(item_id, 0.0) + total * scale
                row = self._rows.setdefault(item_id, {})
                for neighbour, weight in neighbours:
                    row[neighbour] = row.get(neighbour, 0.0) + weight * scale

    def __len__(self) -> int:
        return len(self._totals)

    def _unit(self, ts_ms: int) -> float:
        """The weight of one event at ``ts_ms``, relative to the origin (the origin moves before it grows large)."""
        if not self._rate:
            return 1.0
        self._newest_ms = max(self._newest_ms, ts_ms)
        if self._rate * (self._newest_ms - self._origin_ms) > REBASE_EXPONENT:
            self._rebase(self._newest_ms)
        return math.exp(self._rate * (ts_ms - self._origin_ms))

    def _rebase(self, origin_ms: int) -> None:
        factor = math.exp(-self._rate * (origin_ms - self._origin_ms))
        self._totals = {item_id: total * factor for item_id, total in self._totals.items()}
        self._rows = {item_id: {n: w * factor for n, w in row.items()} for item_id, row in self._rows.items()}
        self._origin_ms = origin_ms

    def _add(self, item_id: str, neighbour: str, weight: float) -> None:
        row = self._rows.setdefault(item_id, {})
        row[neighbour] = row.get(neighbour, 0.0) + weight
        self._totals[item_id] = self._totals.get(item_id, 0.0) + weight
        if self.track_changes:
            self.changed[item_id] = None
        if len(row) > self.spec.neighbours * TRIM_SLACK:
            kept = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[: self.spec.neighbours]
            self._rows[item_id] = dict(kept)

    def _drop_least_connected(self) -> None:
        kept = sorted(self._totals.items(), key=lambda kv: (-kv[1], kv[0]))[: self.spec.capacity]
        self._totals = dict(kept)
        self._rows = {item_id: self._rows[item_id] for item_id in self._totals if item_id in self._rows}
        self.changed = {item_id: None for item_id in self.changed if item_id in self._totals}

    def _row_bytes(self, item_id: str) -> bytes:
        row = self._rows.get(item_id, {})
        return msgpack.packb(
            {
                "v": SNAPSHOT_VERSION,
                "origin_ms": self._origin_ms,
                "newest_ms": self._newest_ms,  # the smoothing is one event at this time
                "total": self._totals.get(item_id, 0.0),
                "neighbours": [[n, w] for n, w in row.items()],
            }
        )


def row_from_bytes(raw: bytes) -> tuple[int, int, float, list[tuple[str, float]]]:
    """A co-occurrence row: the time its weights are relative to, the newest event time counted, its total
    and its neighbours; ``InvalidRecord`` for anything else."""
    try:
        row = msgpack.unpackb(raw)
        if not isinstance(row, dict) or row.get("v") != SNAPSHOT_VERSION:
            raise InvalidRecord(f"not a version-{SNAPSHOT_VERSION} co-occurrence row", "v")
        neighbours = [(str(n), float(w)) for n, w in row["neighbours"]]
        return int(row["origin_ms"]), int(row["newest_ms"]), float(row["total"]), neighbours
    except (ValueError, TypeError, KeyError, msgpack.ExtraData) as exc:
        raise InvalidRecord(f"unreadable co-occurrence row ({exc})", "neighbours") from None


def pairs_with(window: UserWindow, event: Event, span: int) -> list[str] | None:
    """The items an event just added to ``window`` is counted after (at most ``span``, oldest first); None
    for a rejection, which says nothing about what goes together (and leads no list either)."""
    if event.type in REJECTION_TYPES:
        return None
    return [e.item_id for e in window.before(event) if e.type not in REJECTION_TYPES][-span:]


def liked(items: Sequence[str], types: Sequence[str]) -> list[str]:
    """The items of a window that may lead co-occurrence's candidates: all but the rejected."""
    return [item for item, kind in zip(items, types, strict=True) if kind not in REJECTION_TYPES]


class PartitionedCooccurrence:
    """Counts per events partition a worker owns (what is kept for, and handed over with, each partition),
    and their sum over the owned partitions (what lists are scored with)."""

    def __init__(self, spec: CooccurrenceSpec | None = None) -> None:
        self.spec = spec or CooccurrenceSpec()
        self._partitions: dict[int, Cooccurrence] = {}
        self._all = Cooccurrence(self.spec, track_changes=False)
        self._lock = threading.Lock()

    def partition(self, partition: int) -> Cooccurrence:
        with self._lock:
            if partition not in self._partitions:
                self._partitions[partition] = Cooccurrence(self.spec)
            return self._partitions[partition]

    def observe(self, partition: int, before: Sequence[str], item_id: str, ts_ms: int) -> None:
        self.partition(partition).observe(before, item_id, ts_ms)
        self._all.observe(before, item_id, ts_ms)

    def restore(self, partition: int, rows: Sequence[tuple[str, bytes]]) -> None:
        self.partition(partition).restore(rows)
        self._all.restore(rows)

    def owned(self) -> list[int]:
        with self._lock:
            return sorted(self._partitions)

    def drop(self, partition: int) -> None:
        """A partition another worker owns now: its counts go on there, and leave the sum here."""
        with self._lock:
            if self._partitions.pop(partition, None) is None:
                return
            kept = list(self._partitions.values())
        total = Cooccurrence(self.spec, track_changes=False)
        for counts in kept:
            total.restore(counts.rows())
        self._all = total

    def scores(
        self, recent: Sequence[str], depth: int, exclude: Iterable[str] = (), damping: float = 0.0
    ) -> list[tuple[str, float, str]]:
        return self._all.scores(recent, depth, exclude, damping)
