"""Online attribution: which list earned a user's click, and the counts the report's statistics need.

Each user carries, stored with their window (so it is recovered, moved and forgotten with it), the
items of the lists they received within the attribution window and their running totals in the
experiment. A click, add-to-cart or purchase of an item that was in one of those lists is credited to
the list's variant, at the item's rank (and, interleaved, to the team that placed it).

The counts are kept per events partition and per report bucket as sufficient statistics over users:
the number of users, the sums of each total and the sums of every product of two totals. From them the
report computes ratio metrics (clicks per list, hits per engagement) with their variance over users,
the unit of assignment, and with user-level sums no single heavy user can pass for many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from streams.errors import InvalidRecord
from streams.records import Event, Recommendation

ENGAGEMENT_TYPES = frozenset({"click", "add_to_cart", "purchase"})
CONVERSION_TYPES = frozenset({"add_to_cart", "purchase"})
# A user's running totals in an experiment, in this order.
TOTALS = ("lists", "engagements", "clicks", "conversions", "hits", "reciprocal_ranks")
N_TOTALS = len(TOTALS)
PAIRS = np.triu_indices(N_TOTALS)
# Sufficient statistics of a variant: users, the sums of the totals, and the sums of their pairwise products.
N_STATS = 1 + N_TOTALS + len(PAIRS[0])
# Interleaving: users whose credited engagements favour the first team, the second, or neither (a tie).
PREFERENCES = ("first", "second", "tied")
MAX_EXPOSED = 200  # items a user's state remembers from the lists they received
STATE_VERSION = 1


@dataclass
class UserExposure:
    """A user's part in one experiment: their variant, running totals and the items recently shown to them."""

    experiment: str
    variant: str
    totals: list[float] = field(default_factory=lambda: [0.0] * N_TOTALS)
    team_credits: list[int] = field(default_factory=lambda: [0, 0])  # interleaved: credited engagements per team
    shown: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # item → (list's event ts, rank, team)

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "v": STATE_VERSION,
                "e": self.experiment,
                "var": self.variant,
                "t": self.totals,
                "tc": self.team_credits,
                "s": [[item, *at] for item, at in self.shown.items()],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserExposure:
        try:
            obj = _unpacked(raw, "experiment state")
            return cls(
                obj["e"],
                obj["var"],
                [float(t) for t in obj["t"]],
                [int(c) for c in obj["tc"]],
                {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in obj["s"]},
            )
        except (ValueError, KeyError, TypeError, IndexError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise InvalidRecord(f"corrupt experiment state ({type(exc).__name__}: {exc})") from None

    def preference(self) -> int | None:
        """Which team the user's credited engagements favour (0, 1, 2 for a tie), None before any credit."""
        first, second = self.team_credits
        if first == second == 0:
            return None
        return 0 if first > second else 1 if second > first else 2

    def credit(self, event: Event, window_ms: int) -> None:
        """Count an event new to the user's window: an engagement, credited when a recent list showed its item."""
        if event.type not in ENGAGEMENT_TYPES:
            return
        self.totals[1] += 1
        shown = self.shown.get(event.item_id)
        if shown is None or not event.ts - window_ms <= shown[0] <= event.ts:
            return
        _, rank, team = shown
        self.totals[2] += event.type == "click"
        self.totals[3] += event.type in CONVERSION_TYPES
        self.totals[4] += 1
        self.totals[5] += 1.0 / rank
        if team >= 0:
            self.team_credits[team] += 1

    def record(self, rec: Recommendation, teams: Sequence[int], window_ms: int) -> None:
        """A list the user received: its items are remembered (newest list first) for the attribution window."""
        self.totals[0] += 1
        for rank, (item, team) in enumerate(zip((i.item_id for i in rec.items), teams, strict=True), start=1):
            self.shown.pop(item, None)
            self.shown[item] = (rec.event_ts, rank, team)
        oldest = rec.event_ts - window_ms
        kept = [(item, at) for item, at in self.shown.items() if at[0] >= oldest][-MAX_EXPOSED:]
        self.shown = dict(kept)


def stats_of(totals: Sequence[float] | None) -> np.ndarray:
    """One user's contribution to a variant's sufficient statistics (zeros for no user)."""
    stats = np.zeros(N_STATS)
    if totals is not None:
        t = np.asarray(totals, dtype=np.float64)
        stats[0] = 1
        stats[1 : 1 + N_TOTALS] = t
        stats[1 + N_TOTALS :] = np.outer(t, t)[PAIRS]
    return stats


@dataclass
class CountsDelta:
    """What one micro-batch changed in an experiment's counts of one partition and report bucket."""

    variants: dict[str, np.ndarray] = field(default_factory=dict)  # variant → change of its statistics
    preferences: np.ndarray = field(default_factory=lambda: np.zeros(len(PREFERENCES)))

    def move(self, variant: str, before: Sequence[float] | None, after: Sequence[float] | None) -> None:
        """A user's totals in ``variant`` went from ``before`` to ``after`` (None: not in it)."""
        change = stats_of(after) - stats_of(before)
        held = self.variants.get(variant)
        self.variants[variant] = change if held is None else held + change

    def prefer(self, before: int | None, after: int | None) -> None:
        if before is not None:
            self.preferences[before] -= 1
        if after is not None:
            self.preferences[after] += 1


@dataclass
class ExperimentCounts:
    """An experiment's counts in one partition and bucket, as stored in the counts table."""

    experiment: str
    bucket_start_ms: int
    variants: dict[str, np.ndarray] = field(default_factory=dict)
    preferences: np.ndarray = field(default_factory=lambda: np.zeros(len(PREFERENCES)))

    def add(self, delta: CountsDelta) -> None:
        for variant, change in delta.variants.items():
            held = self.variants.get(variant)
            self.variants[variant] = change.copy() if held is None else held + change
        self.preferences = self.preferences + delta.preferences

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "v": STATE_VERSION,
                "experiment": self.experiment,
                "bucket_ms": self.bucket_start_ms,
                "variants": {name: stats.tolist() for name, stats in self.variants.items()},
                "preferences": self.preferences.tolist(),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ExperimentCounts:
        try:
            obj = _unpacked(raw, "experiment counts")
            variants = {name: np.asarray(stats, dtype=np.float64) for name, stats in obj["variants"].items()}
            if any(stats.shape != (N_STATS,) for stats in variants.values()):
                raise InvalidRecord("experiment counts of the wrong length")
            preferences = np.asarray(obj["preferences"], dtype=np.float64)
            return cls(obj["experiment"], int(obj["bucket_ms"]), variants, preferences)
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise InvalidRecord(f"corrupt experiment counts ({type(exc).__name__}: {exc})") from None


def _unpacked(raw: bytes, what: str) -> dict[str, Any]:
    obj = msgpack.unpackb(raw, raw=False)
    if not isinstance(obj, dict) or obj.get("v") != STATE_VERSION:
        raise InvalidRecord(f"unsupported {what} format: {str(obj)[:40]!r}")
    return obj


def counts_key(experiment: str, partition: int, bucket_start_ms: int) -> bytes:
    return f"{experiment}/{partition}/{bucket_start_ms}".encode()
