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
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

from streams.errors import InvalidRecord
from streams.records import REJECTION_TYPES, Event
from streams.state import UserWindow

SNAPSHOT_VERSION = 1
REBASE_EXPONENT = 40.0  # weights are kept relative to a time origin, moved before they overflow
FIRST_SLOTS = 8  # a new row's arrays hold this many neighbours, then double
TRIM_SLACK = 1.5  # a row is cut back to ``neighbours`` once it holds this many times as many
SCORED_TOGETHER = 32  # users whose neighbours are scored in one pass (more cost more per user: larger sorts)
VOCABULARY_GROWTH = 2  # items no longer referenced are forgotten once the vocabulary has grown this many times over


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


class _Rows:
    """Each tracked item's neighbours (vocabulary positions) and their weights, in two numpy arrays per item that
    scoring reads in bulk, with where each neighbour sits in them. Why arrays: a neighbour read from a dictionary
    is an int and a float object somewhere in memory, two cache misses each, which were most of scoring's cost in
    a worker. Why not an object per row: the garbage collector scans such objects, and the bench's 53,000 rows
    as objects of a class of ours made a full collection 130 ms instead of 18; held this way (tuples of arrays
    and dictionaries of numbers, which it leaves out of its scans), 28."""

    def __init__(self) -> None:
        self._slots: dict[int, dict[int, int]] = {}  # item → neighbour → its index in the item's arrays
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # item → (neighbours, weights), room to grow

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[int]:
        return iter(self._slots)

    def __contains__(self, position: object) -> bool:
        return position in self._slots

    def add(self, position: int, neighbour: int, weight: float) -> int:
        """Add ``weight`` to a neighbour of ``position``; returns how many neighbours it has."""
        slots = self._slots.get(position)
        if slots is None:
            slots = self.track(position)
        slot = slots.get(neighbour)
        if slot is not None:
            self._arrays[position][1][slot] += weight
            return len(slots)
        neighbours, weights = self._arrays[position]
        slot = slots[neighbour] = len(slots)
        if slot == len(neighbours):
            neighbours, weights = _grown(neighbours), _grown(weights)
            self._arrays[position] = (neighbours, weights)
        neighbours[slot] = neighbour
        weights[slot] = weight
        return slot + 1

    def track(self, position: int) -> dict[int, int]:
        """``position``'s row (an empty one for an item not tracked yet): neighbour → index in its arrays."""
        slots = self._slots.get(position)
        if slots is None:
            slots = self._slots[position] = {}
            self._arrays[position] = (np.empty(FIRST_SLOTS, dtype=np.int64), np.empty(FIRST_SLOTS))
        return slots

    def arrays(self, position: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The neighbours and weights of ``position`` (views, valid until the next change), None if untracked."""
        return self._used(position) if position in self._slots else None

    def pairs(self, position: int) -> list[tuple[int, float]]:
        neighbours, weights = self._used(position)
        return list(zip(neighbours.tolist(), weights.tolist(), strict=True))

    def replace(self, position: int, pairs: Sequence[tuple[int, float]]) -> None:
        self.drop(position)
        self.track(position)
        for neighbour, weight in pairs:
            self.add(position, neighbour, weight)

    def drop(self, position: int) -> None:
        self._slots.pop(position, None)
        self._arrays.pop(position, None)

    def scale(self, factor: float) -> None:
        for position in self._slots:
            self._used(position)[1][:] *= factor  # the used part: the room beyond holds whatever memory held

    def renumbered(self, new_position: np.ndarray) -> _Rows:
        """The same rows, every position ``p`` (item or neighbour) become ``new_position[p]``."""
        rows = _Rows()
        for position in self._slots:
            neighbours, weights = self._used(position)
            pairs = list(zip(new_position[neighbours].tolist(), weights.tolist(), strict=True))
            rows.replace(int(new_position[position]), pairs)
        return rows

    def neighbours_of_all(self) -> set[int]:
        return {n for position in self._slots for n in self._used(position)[0].tolist()}

    def _used(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        neighbours, weights = self._arrays[position]
        size = len(self._slots[position])
        return neighbours[:size], weights[:size]


def _grown(values: np.ndarray) -> np.ndarray:
    grown = np.empty(2 * len(values), dtype=values.dtype)
    grown[: len(values)] = values
    return grown


Anchor = tuple[str, tuple[np.ndarray, np.ndarray], float]  # a user's newest item: id, (neighbours, weights), share


class Cooccurrence:
    """Items are kept by their position in a vocabulary, and each row's neighbours in arrays (``_Rows``): scoring a
    user reads contiguous memory instead of dictionary entries and strings scattered over the heap."""

    def __init__(self, spec: CooccurrenceSpec | None = None, track_changes: bool = True) -> None:
        self.spec = spec or CooccurrenceSpec()
        self.track_changes = track_changes  # for ``take_changed``: counts that are kept elsewhere
        self._rate = math.log(2) / (self.spec.half_life_s * 1000) if self.spec.half_life_s else 0.0
        self._origin_ms = 0  # weights are multiples of one event's weight at this time
        self._newest_ms = 0
        self._names: list[str] = []  # vocabulary position → item id
        self._positions: dict[str, int] = {}  # item id → vocabulary position
        self._totals = array("d")  # position → every weight its item took part in, trimmed neighbours included
        self._rows = _Rows()  # of the tracked items
        self._compacted_size = 0  # the vocabulary's size after it was last compacted
        self._lock = threading.Lock()  # the events thread writes while HTTP requests read
        self.changed: dict[str, None] = {}  # items whose row changed since ``take_changed``, in that order

    def observe(self, before: Sequence[str], item_id: str, ts_ms: int) -> None:
        """``item_id`` happened at ``ts_ms`` after ``before`` (the user's previous items, newest last)."""
        with self._lock:
            unit = self._unit(ts_ms)
            later = self._position(item_id)
            for step, earlier in enumerate(reversed(before[-self.spec.span :]), start=1):
                if earlier == item_id:
                    continue
                weight = unit / step
                first = self._position(earlier)
                self._add(first, later, weight)
                self._add(later, first, 0.5 * weight)
            if len(self._rows) > self.spec.capacity * 1.2:  # trim in bulk, not on every event
                self._drop_least_connected()

    def scores(
        self, recent: Sequence[str], depth: int, exclude: Iterable[str] = (), damping: float = 0.0
    ) -> list[tuple[str, float, str]]:
        """The ``depth`` best items for a user whose newest items are ``recent`` (newest last):
        (item, score, the recent item that contributed most), best first; only items with a score.
        A neighbour's weight is divided by its total to the power ``0.5 + damping``."""
        return self.scores_many([(recent, exclude)], depth, damping)[0]

    def scores_many(
        self, users: Sequence[tuple[Sequence[str], Iterable[str]]], depth: int, damping: float = 0.0
    ) -> list[list[tuple[str, float, str]]]:
        """``scores`` of each user's (recent, exclude), a few users' neighbours in one pass."""
        with self._lock:
            smoothing = self._unit(self._newest_ms)
            return [
                best
                for first in range(0, len(users), SCORED_TOGETHER)
                for best in self._scores_of(users[first : first + SCORED_TOGETHER], depth, damping, smoothing)
            ]

    def _scores_of(
        self, users: Sequence[tuple[Sequence[str], Iterable[str]]], depth: int, damping: float, smoothing: float
    ) -> list[list[tuple[str, float, str]]]:
        anchored = [self._anchors(recent, smoothing) for recent, _ in users]
        anchors = [anchor for of_user in anchored for anchor in of_user]
        if not anchors or depth < 1:
            return [[] for _ in users]
        user_of_pair, neighbour_of_pair, scores, leading = self._pairs(anchored, anchors, damping, smoothing)
        ranked = np.lexsort((-scores, user_of_pair))
        starts = np.searchsorted(user_of_pair, np.arange(len(users) + 1)).tolist()
        spans = [(start, end, exclude) for start, end, (_, exclude) in zip(starts[:-1], starts[1:], users, strict=True)]
        lists = self._best(
            scores[ranked].tolist(), neighbour_of_pair[ranked].tolist(), leading[ranked].tolist(), spans, depth
        )
        return [[(item_id, -negated, anchors[a][0]) for negated, item_id, a in best] for best in lists]

    def _pairs(
        self, anchored: Sequence[Sequence[Anchor]], anchors: Sequence[Anchor], damping: float, smoothing: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each (user, neighbour) pair's user, neighbour, score and leading anchor (its index in ``anchors``),
        in the order of (user, neighbour)."""
        # By entry (an anchor's neighbour) first; a pair sums its entries.
        from_anchor = np.repeat(np.arange(len(anchors)), [len(neighbours) for _, (neighbours, _), _ in anchors])
        parts = np.concatenate([weights for _, (_, weights), _ in anchors])
        parts *= np.array([share for _, _, share in anchors])[from_anchor]
        neighbours = np.concatenate([neighbours for _, (neighbours, _), _ in anchors])
        of_user = np.repeat(np.arange(len(anchored)), [len(a) for a in anchored])[from_anchor]
        pairs, pair_of_entry = np.unique(of_user * len(self._names) + neighbours, return_inverse=True)
        user_of_pair, neighbour_of_pair = np.divmod(pairs, len(self._names))
        # Every anchor's part of a neighbour is divided by the same total: summed first, divided once.
        totals = np.frombuffer(self._totals)[neighbour_of_pair]
        scores = np.bincount(pair_of_entry, weights=parts, minlength=len(pairs)) / (totals + smoothing) ** (
            0.5 + damping
        )
        by_part = np.lexsort((-parts, pair_of_entry))  # stable: of equal parts, the newest anchor's first
        leading = from_anchor[by_part[np.flatnonzero(np.diff(pair_of_entry[by_part], prepend=-1))]]
        return user_of_pair, neighbour_of_pair, scores, leading

    def _anchors(self, recent: Sequence[str], smoothing: float) -> list[Anchor]:
        """A user's newest items that have neighbours, newest first: (item, its row, its share of the score)."""
        newest: list[str] = []  # each item once
        for item_id in reversed(recent):
            if item_id not in newest:
                newest.append(item_id)
                if len(newest) == self.spec.newest:
                    break
        return [
            (anchor, row, 0.5**age / math.sqrt(self._totals[position] + smoothing))
            for age, anchor in enumerate(newest)
            if (position := self._positions.get(anchor)) is not None
            and (row := self._rows.arrays(position)) is not None
            and len(row[0])
        ]

    def _best(
        self,
        scores: list[float],
        neighbours: list[int],
        leading: list[int],
        users: Sequence[tuple[int, int, Iterable[str]]],
        depth: int,
    ) -> list[list[tuple[float, str, int]]]:
        """Each user's ``depth`` best (negated score, item, leading anchor), ties by item, from their span
        (start, end, excluded items) of pairs ranked by score."""
        names = self._names
        lists = []
        for start, end, exclude in users:
            skip = set(exclude)
            best: list[tuple[float, str, int]] = []
            for i in range(start, end):
                if len(best) >= depth and -scores[i] > best[-1][0]:  # past the last that ties the depth-th
                    break
                if (item_id := names[neighbours[i]]) not in skip:
                    best.append((-scores[i], item_id, leading[i]))
            best.sort()
            lists.append(best[:depth])
        return lists

    def take_changed(self, limit: int | None = None) -> list[tuple[str, bytes]]:
        """The rows changed since they were last taken (at most ``limit``, those changed first first), each
        as a snapshot record (``row_from_bytes``)."""
        with self._lock:
            taken = list(itertools.islice(self.changed, limit))
            for item_id in taken:
                del self.changed[item_id]
            return [(item_id, self._row_bytes(self._positions[item_id])) for item_id in taken]

    def rows(self) -> list[tuple[str, bytes]]:
        """Every row, as ``take_changed`` gives them."""
        with self._lock:
            return [(self._names[position], self._row_bytes(position)) for position in self._rows]

    def restore(self, rows: Iterable[tuple[str, bytes]]) -> None:
        """Merge rows written by ``take_changed`` (of this partition, by an earlier owner)."""
        with self._lock:
            for item_id, raw in rows:
                origin_ms, newest_ms, total, neighbours = row_from_bytes(raw)
                if self._rate and origin_ms > self._origin_ms:
                    self._rebase(origin_ms)
                scale = math.exp(self._rate * (origin_ms - self._origin_ms))  # 1 without decay
                self._newest_ms = max(self._newest_ms, newest_ms)
                position = self._position(item_id)
                self._totals[position] += total * scale
                self._rows.track(position)
                for neighbour, weight in neighbours:
                    self._rows.add(position, self._position(neighbour), weight * scale)

    def __len__(self) -> int:
        return len(self._rows)

    def _position(self, item_id: str) -> int:
        position = self._positions.get(item_id)
        if position is None:
            position = self._positions[item_id] = len(self._names)
            self._names.append(item_id)
            self._totals.append(0.0)
        return position

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
        np.frombuffer(self._totals)[:] *= factor
        self._rows.scale(factor)
        self._origin_ms = origin_ms

    def _add(self, position: int, neighbour: int, weight: float) -> None:
        size = self._rows.add(position, neighbour, weight)
        self._totals[position] += weight
        if self.track_changes:
            self.changed[self._names[position]] = None
        if size > self.spec.neighbours * TRIM_SLACK:
            names = self._names
            kept = sorted(self._rows.pairs(position), key=lambda pair: (-pair[1], names[pair[0]]))
            self._rows.replace(position, kept[: self.spec.neighbours])

    def _drop_least_connected(self) -> None:
        names, totals = self._names, self._totals
        ranked = sorted(self._rows, key=lambda position: (-totals[position], names[position]))
        for position in ranked[self.spec.capacity :]:
            self._rows.drop(position)
            totals[position] = 0.0
        self.changed = {item_id: None for item_id in self.changed if self._positions[item_id] in self._rows}
        if len(names) > VOCABULARY_GROWTH * max(self._compacted_size, self.spec.capacity):
            self._compact()

    def _compact(self) -> None:
        """Forget the items that neither are tracked nor are a tracked item's neighbour (positions renumbered)."""
        used = set(self._rows) | self._rows.neighbours_of_all()
        kept = sorted(used)
        renumbered = np.zeros(len(self._names), dtype=np.int64)
        renumbered[kept] = np.arange(len(kept))
        self._names = [self._names[position] for position in kept]
        self._compacted_size = len(kept)
        self._positions = {item_id: position for position, item_id in enumerate(self._names)}
        self._totals = array("d", np.frombuffer(self._totals)[kept].tobytes())
        self._rows = self._rows.renumbered(renumbered)

    def _row_bytes(self, position: int) -> bytes:
        names = self._names
        return msgpack.packb(
            {
                "v": SNAPSHOT_VERSION,
                "origin_ms": self._origin_ms,
                "newest_ms": self._newest_ms,  # the smoothing is one event at this time
                "total": self._totals[position],
                "neighbours": [[names[n], w] for n, w in self._rows.pairs(position)],
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

    def scores_many(
        self, users: Sequence[tuple[Sequence[str], Iterable[str]]], depth: int, damping: float = 0.0
    ) -> list[list[tuple[str, float, str]]]:
        return self._all.scores_many(users, depth, damping)
