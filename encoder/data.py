"""Sequences to learn from and to evaluate on: per-user histories over a catalogue. No torch.

Item numbers here are catalogue rows (0-based); the model's item index is the row
plus one, because index 0 stands for an item the model never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class History:
    """One user's events, oldest first: catalogue rows, type names, event times (0 when unknown)."""

    items: np.ndarray  # int64 [n]
    types: Sequence[str]
    ts_ms: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int) -> History:
        return History(self.items[:n], self.types[:n], self.ts_ms[:n])

    def tail(self, n: int) -> History:
        """The newest ``n`` events."""
        return self if len(self) <= n else History(self.items[-n:], self.types[-n:], self.ts_ms[-n:])


@dataclass(frozen=True)
class Example:
    """Predict ``target`` (a catalogue row) from ``history``."""

    user: str
    history: History
    target: int


@dataclass
class Dataset:
    """A catalogue and a leave-one-out split: train sequences, a validation and a test example per user."""

    name: str
    item_ids: list[str]
    train: list[History]
    valid: list[Example]
    test: list[Example]
    item_texts: list[str] | None = None
    has_time: bool = False
    notes: list[str] = field(default_factory=list)
    # The training sequences extended by their validation targets: everything before the test
    # targets. A model refit on them (``--refit``) learns each user's newest transitions too.
    train_and_valid: list[History] = field(default_factory=list)
    # Named subsets of the test users (a bool mask over ``test``), each also reported on its own.
    test_groups: dict[str, np.ndarray] = field(default_factory=dict)
    new_items: int = 0  # items held out of every training sequence (``with_new_items``)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def event_types(self) -> tuple[str, ...]:
        return tuple(sorted({t for h in self.train for t in h.types}))

    def describe(self) -> dict[str, object]:
        return {
            "data": self.name,
            "items": self.n_items,
            "train_users": len(self.train),
            "train_events": int(sum(len(h) for h in self.train)),
            "valid_users": len(self.valid),
            "test_users": len(self.test),
            "text": self.item_texts is not None,
            "time": self.has_time,
        } | ({"new_items": self.new_items} if self.new_items else {})

    def training_sequences(self, refit: bool) -> list[History]:
        """What a model trains on: the training part, or with ``refit`` also the validation targets."""
        if refit and not self.train_and_valid:
            raise ValueError(f"{self.name} has no training + validation sequences to refit on")
        return self.train_and_valid if refit else self.train

    def with_new_items(self, fraction: float, seed: int = 0) -> Dataset:
        """The same split with a seeded random share of the items taken out of every training sequence,
        as if published after training; the test users whose target is one of them measure cold start."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the share of new items must be in (0, 1), got {fraction}")
        held = np.zeros(self.n_items, dtype=bool)
        count = max(1, round(fraction * self.n_items))
        held[np.random.default_rng(seed).choice(self.n_items, size=count, replace=False)] = True

        def without_held(history: History) -> History:
            keep = ~held[history.items]
            types = [t for t, kept in zip(history.types, keep, strict=True) if kept]
            return History(history.items[keep], types, history.ts_ms[keep])

        note = f"{count:,} items ({fraction:.0%}, seed {seed}) held out of training as new items: text only."
        return replace(
            self,
            train=[without_held(h) for h in self.train],
            # Validation picks the epoch on what training knows; new items are the test's question.
            valid=[e for e in self.valid if not held[e.target]],
            train_and_valid=[without_held(h) for h in self.train_and_valid],
            notes=[*self.notes, note],
            new_items=count,
        )

    def trained_items(self, refit: bool = False) -> np.ndarray:
        """Rows that occur in some training sequence; the others are cold for the model."""
        return self.occurrences(refit) > 0

    def occurrences(self, refit: bool = False) -> np.ndarray:
        """int64 [n_items]: how often each row occurs in the training sequences."""
        return occurrences(self.training_sequences(refit), self.n_items)


def occurrences(histories: Sequence[History], n_items: int) -> np.ndarray:
    """int64 [n_items]: how often each row occurs in ``histories``."""
    rows = [history.items for history in histories]
    return np.bincount(np.concatenate(rows), minlength=n_items) if rows else np.zeros(n_items, np.int64)


@dataclass(frozen=True)
class LoggedEvent:
    """One event of a timestamped log, as a stream would carry it."""

    user: str
    item: int  # catalogue row
    type: str
    ts_ms: int


@dataclass
class EventLog:
    """Per-user histories in event time over a catalogue: the raw material of both kinds of evaluation."""

    name: str
    item_ids: list[str]
    histories: dict[str, History]
    item_texts: list[str] | None = None
    has_time: bool = False

    def split(self) -> Dataset:
        """The leave-one-out split (offline evaluation and training)."""
        return leave_one_out(self.name, self.item_ids, self.histories, self.item_texts, self.has_time)

    def before(self, ts_ms: int) -> EventLog:
        """The same log cut at ``ts_ms``: only events strictly earlier (users with none drop out)."""
        cut = {}
        for user, history in self.histories.items():
            n = int(np.searchsorted(history.ts_ms, ts_ms, side="left"))
            if n:
                cut[user] = history.head(n)
        return EventLog(f"{self.name} before {ts_ms}", self.item_ids, cut, self.item_texts, self.has_time)

    def events(self) -> list[LoggedEvent]:
        """Every event in event-time order (ties: by user, then by position in the user's history)."""
        ordered = sorted((int(h.ts_ms[i]), user, i) for user, h in self.histories.items() for i in range(len(h)))
        return [
            LoggedEvent(user, int(self.histories[user].items[i]), self.histories[user].types[i], ts)
            for ts, user, i in ordered
        ]

    def time_quantile(self, fraction: float) -> int:
        """The event time before which ``fraction`` of the events happened."""
        times = np.concatenate([h.ts_ms for h in self.histories.values()])
        return int(np.quantile(times, fraction, method="higher"))


def leave_one_out(
    name: str,
    item_ids: list[str],
    histories: dict[str, History],
    item_texts: list[str] | None = None,
    has_time: bool = False,
) -> Dataset:
    """The published protocol: last event → test, the one before → validation, the rest → training.

    Users with fewer than three events cannot be split that way; their events still train the model.
    """
    train: list[History] = []
    train_and_valid: list[History] = []
    valid: list[Example] = []
    test: list[Example] = []
    for user, history in histories.items():
        n = len(history)
        if n >= 3:
            train.append(history.head(n - 2))
            train_and_valid.append(history.head(n - 1))
            valid.append(Example(user, history.head(n - 2), int(history.items[n - 2])))
            test.append(Example(user, history.head(n - 1), int(history.items[n - 1])))
        elif n:
            train.append(history)
            train_and_valid.append(history)
    return Dataset(name, item_ids, train, valid, test, item_texts, has_time, train_and_valid=train_and_valid)
