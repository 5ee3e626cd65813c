"""The per-user sliding window: a bounded, event-time-ordered value object.

Pure Python, no Faust import: the agent stores its bytes in a plain Faust table
keyed by user (Faust's windowed tables have open expiry bugs). The window is
bounded by count and by a horizon measured in *event time* from the newest
event it holds, so replaying a stream rebuilds exactly the same windows.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import deque
from enum import Enum
from typing import Any, NamedTuple

import msgpack
import numpy as np

from streams.errors import InvalidRecord
from streams.records import Event

# v2 remembers event ids as 64-bit digests: a stored window shrank from ~22 KB to ~6 KB
# (500 remembered ids), and every micro-batch writes one per touched user. v3 also keeps the
# entries evicted last, so that a replayed event's list is rebuilt from the window it saw
# (``as_of``). v4 remembers up to when a forget-user command erased the user's events, so that
# a replayed event or command cannot undo or overreach it. v5 carries the user's part in a running
# experiment (``streams.experiments.attribution``). v6 keeps the co-occurrence candidates of the
# user's last lists (``together_for``). v7 keeps each of those lists as the bytes it was packed to when it
# was ranked: only a replay reads one, and repacking 8 lists of 50 candidates at every store was most of the
# cost of storing a window. v8 keeps with each list its trigger's offset, and lets a list go once that offset
# is committed (never to be delivered again) rather than after the last 8: a worker killed 2.8 s after its
# last commit replays every list of those seconds, more than 8 for a busy user. v1 to v7 are still read.
WINDOW_FORMAT_VERSION = 8
_READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
TOGETHER_KEPT = 128  # lists awaiting their commit a window keeps at most (a user's 2.8 s at 45 lists a second)

Together = tuple[tuple[str, float, str], ...]  # co-occurrence's candidates: (item, score, the window item it follows)


def event_digest(event_id: str) -> int:
    """64 bits of the event id: a false duplicate among a user's last ids has odds of ~1e-14."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest(), "little")


class WindowEntry(NamedTuple):
    # Field order is the sort order: event time first, event id breaks ties deterministically.
    # A tuple, not a dataclass: restoring a 50-event window built and sorted dataclasses in ~80 µs.
    ts: int
    event_id: str
    item_id: str
    type: str
    value: float | None = None


class AddOutcome(Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"
    TOO_OLD = "too_old"
    FORGOTTEN = "forgotten"  # at or before the time up to which the user asked to be forgotten


class UserWindow:
    """The newest ``max_events`` events within ``horizon_ms`` of the newest one, oldest first.

    Event ids seen recently (up to ``dedup_capacity`` of them, also those already
    evicted) are remembered, in the order they arrived, so that a redelivered event changes
    nothing. The newest ``max_events`` evicted entries are kept too: with the arrival order
    they rebuild the window as it was when an earlier event arrived (``as_of``).

    A forget-user command erases every event up to its time (``forget``) and the window keeps
    refusing events from before it: its Kafka topic is not ordered with the events, so after a
    crash a command can be replayed after the user's later events, or an erased event after the
    command, and either way round the outcome is that of the first pass.
    """

    __slots__ = (
        "_entries",
        "_evicted",
        "_seen",
        "_seen_order",
        "dedup_capacity",
        "experiment",
        "forgotten_until",
        "horizon_ms",
        "max_events",
        "together",
        "together_offsets",
    )

    def __init__(self, max_events: int, horizon_ms: int, dedup_capacity: int) -> None:
        self.max_events = max_events
        self.horizon_ms = horizon_ms
        self.dedup_capacity = max(dedup_capacity, max_events)
        self._entries: list[WindowEntry] = []
        self._evicted: list[WindowEntry] = []  # oldest first, at most max_events
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self.forgotten_until = 0  # event time (ms) up to which the user's events are erased; 0: never
        # The co-occurrence candidates each of the last lists was ranked with, by its trigger's digest: the
        # counts move on with every user's events, and a redelivered event's list must be the one first sent.
        # Packed (``_pack_together``): read back only for a replay.
        self.together: dict[int, bytes] = {}
        self.together_offsets: dict[int, int] = {}  # a kept list's trigger offset, where it is known
        # The user's part in a running experiment, opaque here: kept with the window so that it is stored,
        # recovered, moved and forgotten with it. Empty outside experiments.
        self.experiment = b""

    @property
    def entries(self) -> tuple[WindowEntry, ...]:
        return tuple(self._entries)

    @property
    def evicted(self) -> tuple[WindowEntry, ...]:
        """The entries evicted last (oldest first), kept to rebuild earlier windows."""
        return tuple(self._evicted)

    @property
    def item_ids(self) -> list[str]:
        return [e.item_id for e in self._entries]

    @property
    def newest_ts(self) -> int | None:
        return self._entries[-1].ts if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, event: Event) -> AddOutcome:
        if event.ts <= self.forgotten_until:
            return AddOutcome.FORGOTTEN
        digest = event_digest(event.event_id)
        if digest in self._seen:
            return AddOutcome.DUPLICATE
        self._remember(digest)
        newest = self.newest_ts
        if newest is not None and event.ts < newest - self.horizon_ms:
            return AddOutcome.TOO_OLD
        entry = WindowEntry(event.ts, event.event_id, event.item_id, event.type, event.value)
        bisect.insort(self._entries, entry)
        self._evict()
        # An out-of-order event older than everything in a full window is evicted at once.
        return AddOutcome.ADDED if entry in self._entries else AddOutcome.TOO_OLD

    def before(self, event: Event) -> list[WindowEntry]:
        """The entries before ``event``'s in event time, oldest first."""
        entry = WindowEntry(event.ts, event.event_id, event.item_id, event.type, event.value)
        return self._entries[: bisect.bisect_left(self._entries, entry)]

    def remember_together(self, trigger_id: str, candidates: Together, offset: int | None = None) -> None:
        """Keep the co-occurrence candidates of ``trigger_id``'s list, for a replay, until ``offset`` (the
        trigger's in its partition) is committed (``release_together``)."""
        digest = event_digest(trigger_id)
        self.together[digest] = _pack_together(candidates)
        if offset is not None:
            self.together_offsets[digest] = offset
        while len(self.together) > TOGETHER_KEPT:
            oldest = next(iter(self.together))
            del self.together[oldest]
            self.together_offsets.pop(oldest, None)

    def release_together(self, committed: int | None) -> None:
        """Let go of the lists whose triggers lie before the partition's ``committed`` offset (None: unknown)."""
        if committed is None:
            return
        for digest in [d for d, offset in self.together_offsets.items() if offset < committed]:
            del self.together[digest], self.together_offsets[digest]

    def together_for(self, trigger_id: str) -> Together | None:
        """The co-occurrence candidates the list of ``trigger_id`` was ranked with, if still kept;
        ``InvalidRecord`` if what was stored for it does not unpack."""
        packed = self.together.get(event_digest(trigger_id))
        return None if packed is None else _unpack_together(packed)

    def forget(self, until_ts: int) -> int:
        """Erase every event at or before ``until_ts`` (also those evicted, and their ids) and the user's
        experiment state, and refuse such events from now on. Returns how many entries were erased."""
        self.forgotten_until = max(self.forgotten_until, until_ts)
        self.experiment = b""
        self.together, self.together_offsets = {}, {}
        held = len(self._entries) + len(self._evicted)
        self._entries = [e for e in self._entries if e.ts > self.forgotten_until]
        self._evicted = [e for e in self._evicted if e.ts > self.forgotten_until]
        kept = {event_digest(e.event_id) for e in self._entries + self._evicted}
        self._seen_order = deque(d for d in self._seen_order if d in kept)
        self._seen = set(self._seen_order)
        return held - len(self._entries) - len(self._evicted)

    def _remember(self, digest: int) -> None:
        self._seen.add(digest)
        self._seen_order.append(digest)
        while len(self._seen_order) > self.dedup_capacity:
            self._seen.discard(self._seen_order.popleft())

    def as_of(self, event_id: str) -> UserWindow | None:
        """The window as it was once ``event_id`` had been added (a redelivered event's list is then
        the one first sent), or None when that can no longer be told: the id is forgotten, or an
        entry that window held may have been evicted past those kept."""
        digest = event_digest(event_id)
        if digest not in self._seen:
            return None
        arrived = set(itertools.takewhile(lambda d: d != digest, self._seen_order)) | {digest}
        kept = sorted(e for e in self._evicted + self._entries if event_digest(e.event_id) in arrived)
        then = UserWindow(self.max_events, self.horizon_ms, self.dedup_capacity)
        then.forgotten_until = self.forgotten_until
        then._entries = list(kept)
        if kept:
            then._evict()
        # Entries evicted past those kept are older than all of them: that window could have held one
        # only if it was neither full nor cut by the horizon, and some were dropped.
        none_dropped = len(self._evicted) < self.max_events
        full = len(then._entries) == self.max_events
        cut_by_horizon = bool(kept) and kept[0].ts < then._entries[-1].ts - self.horizon_ms
        if not (none_dropped or full or cut_by_horizon):
            return None
        then._evicted = []
        return then

    def _evict(self) -> None:
        evicted = []
        if len(self._entries) > self.max_events:
            evicted = self._entries[: len(self._entries) - self.max_events]
            del self._entries[: len(evicted)]
        cutoff = self._entries[-1].ts - self.horizon_ms
        first_kept = bisect.bisect_left([e.ts for e in self._entries], cutoff)
        if first_kept:
            evicted += self._entries[:first_kept]
            del self._entries[:first_kept]
        # Every add to a full window evicts one entry: insert it, rather than re-sort what is kept.
        for entry in evicted:
            bisect.insort(self._evicted, entry)
        del self._evicted[: -self.max_events]

    # ------------------------------------------------------------ storage format

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "v": WINDOW_FORMAT_VERSION,
                # Entries are tuples of the stored fields in order: msgpack packs them as the stored arrays.
                "entries": self._entries,
                "evicted": self._evicted,
                "seen": np.fromiter(self._seen_order, dtype="<u8", count=len(self._seen_order)).tobytes(),
                "forgotten": self.forgotten_until,
                "experiment": self.experiment,
                "together": [
                    [digest, candidates, self.together_offsets.get(digest)]
                    for digest, candidates in self.together.items()
                ],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, raw: bytes, max_events: int, horizon_ms: int, dedup_capacity: int) -> UserWindow:
        """Restore a stored window; current limits apply (a lowered limit trims it)."""
        try:
            obj: dict[str, Any] = msgpack.unpackb(raw, raw=False)
            if obj.get("v") not in _READABLE_VERSIONS:
                raise InvalidRecord(f"unsupported window format version {obj.get('v')!r}")
            window = cls(max_events, horizon_ms, dedup_capacity)
            seen = obj["seen"]  # oldest first
            digests = np.frombuffer(seen, dtype="<u8").tolist() if obj["v"] >= 2 else [event_digest(i) for i in seen]
            kept = digests[-window.dedup_capacity :]
            window._seen_order = deque(kept)
            window._seen = set(kept)
            window._entries = sorted(WindowEntry(*row) for row in obj["entries"])
            window._evicted = sorted(WindowEntry(*row) for row in obj.get("evicted", ()))[-window.max_events :]
            window.forgotten_until = int(obj.get("forgotten", 0))
            window.experiment = bytes(obj.get("experiment", b""))
            together = obj.get("together", ())
            window.together = (
                {int(kept[0]): _packed(kept[1]) for kept in together}
                if obj["v"] >= 7
                else {int(digest): _pack_together(_candidates(listed)) for digest, listed in together}
            )
            window.together_offsets = {
                int(kept[0]): int(kept[2]) for kept in together if obj["v"] >= 8 and kept[2] is not None
            }
        except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise InvalidRecord(f"corrupt stored window ({type(exc).__name__}: {exc})") from None
        if window._entries:
            window._evict()
        return window

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserWindow) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"UserWindow({len(self._entries)} events, newest_ts={self.newest_ts})"


def _pack_together(candidates: Together) -> bytes:
    return msgpack.packb(candidates)


def _unpack_together(packed: bytes) -> Together:
    try:
        return _candidates(msgpack.unpackb(packed))
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        reason = f"corrupt co-occurrence candidates in a stored window ({type(exc).__name__}: {exc})"
        raise InvalidRecord(reason) from None


def _candidates(listed: Any) -> Together:
    return tuple((str(item_id), float(score), str(anchor)) for item_id, score, anchor in listed)


def _packed(raw: Any) -> bytes:
    if not isinstance(raw, bytes):
        raise TypeError(f"packed co-occurrence candidates are {type(raw).__name__}, not bytes")
    return raw
