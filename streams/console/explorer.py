"""What the console shows of a user and of an item, read from the worker's state and store.

Nothing here writes: a user's list is computed from their window as it stands, as the HTTP
API computes it, and the lists of their last few events from the window as each event left it
(``UserWindow.as_of``), with the model serving now. Calls the model and the store, so the
worker runs these on the events agent's thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.errors import InvalidRecord
from streams.experiments.attribution import TOTALS
from streams.experiments.serving import RunningExperiment
from streams.pipeline import EventBatchProcessor
from streams.ports import SearchQuery
from streams.records import Recommendation
from streams.state import UserWindow, WindowEntry

CHANGES_SHOWN = 5  # the last events whose effect on the list is shown
NEIGHBOURS_SHOWN = 10
_ITEM_FIELDS = ["title", "category", "tags", "price", "available", "ts"]


@dataclass(frozen=True)
class ListChange:
    """What one event did to the user's list."""

    event: WindowEntry
    entered: list[str]
    left: list[str]


@dataclass(frozen=True)
class ShownItem:
    item_id: str
    score: float
    reason: str
    explained_by: tuple[str, ...]
    interest: int | None  # which of a multi-interest user's interests it is closest to
    team: str | None = None  # in an interleaved experiment, the variant that placed it


@dataclass
class UserView:
    user_id: str
    state_key: str | None  # the pseudonym the state is kept under, when ids are pseudonymised
    problem: str = ""  # why there is nothing to show ("" when there is)
    entries: list[WindowEntry] = field(default_factory=list)  # newest first
    evicted: list[WindowEntry] = field(default_factory=list)  # newest first
    forgotten_until: int = 0
    items: list[ShownItem] = field(default_factory=list)
    interests: int = 1
    changes: list[ListChange] = field(default_factory=list)  # newest first
    catalog: dict[str, dict[str, Any]] = field(default_factory=dict)  # payloads of every item shown
    experiment: str = ""  # "<experiment>: <variant>" while an experiment runs; their list is then the variant's
    experiment_totals: dict[str, float] = field(default_factory=dict)  # their running totals in it


@dataclass
class ItemView:
    item_id: str
    payload: dict[str, Any] | None  # None: not in the catalogue (never published, or deleted)
    neighbours: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)  # nearest first


class Explorer:
    def __init__(self, state_key: Callable[[str], str], events: EventBatchProcessor, k: int) -> None:
        self.state_key = state_key
        self.events = events
        self.k = k

    def window_key(self, user_id: str) -> bytes:
        return self.state_key(user_id).encode("utf-8")

    def user(self, user_id: str, raw: bytes | None) -> UserView:
        """The view of ``user_id`` whose stored window is ``raw`` (the table's bytes under ``window_key``)."""
        key = self.state_key(user_id)
        view = UserView(user_id, key if key != user_id else None)
        if raw is None:
            view.problem = "no events of this user are in the window (never seen, or not on this worker's partitions)"
            return view
        try:
            window = self.events.window_limits.load(raw)
        except InvalidRecord as exc:
            view.problem = f"the stored window is unreadable ({exc.reason}); the user's next event starts it afresh"
            return view
        view.entries, view.evicted = list(reversed(window.entries)), list(reversed(window.evicted))
        view.forgotten_until = window.forgotten_until
        if not window.entries:
            view.problem = "the user was forgotten" if window.forgotten_until else "the window holds no events"
            return view
        experiment = self.events.experiment
        if experiment is not None:
            self._in_experiment(view, experiment, window)
        else:
            now = self.events.recommender.current_with_interests(user_id, window, self.k)
            if now is None:
                view.problem = "no item of the window is still in the catalogue"
            else:
                view.items, view.interests = self._shown(*now)
        view.changes = self._changes(user_id, window)
        shown_ids = {e.item_id for e in window.entries + window.evicted} | {i.item_id for i in view.items}
        shown_ids |= {i for change in view.changes for i in change.entered + change.left}
        view.catalog = self._payloads(sorted(shown_ids))
        return view

    def item(self, item_id: str) -> ItemView:
        payload = self._payloads([item_id]).get(item_id)
        view = ItemView(item_id, payload)
        recommender = self.events.recommender
        vectors = recommender.item_vectors([item_id])
        if payload is None or item_id not in vectors:
            return view
        query = SearchQuery(vectors[item_id], NEIGHBOURS_SHOWN, exclude_ids=[item_id], only_available=False)
        hits = recommender.store.search_batch(recommender.items_collection, [query])[0]
        payloads = self._payloads([hit.id for hit in hits])
        view.neighbours = [(hit.id, hit.score, payloads.get(hit.id, {})) for hit in hits]
        return view

    def _in_experiment(self, view: UserView, experiment: RunningExperiment, window: UserWindow) -> None:
        """The user's variant, their totals in the experiment, and their list as their variant makes it."""
        view.experiment = f"{experiment.name}: {experiment.label(view.user_id)}"
        exposure = experiment.exposure_of(view.user_id, window)
        if exposure is not None:
            view.experiment_totals = dict(zip(TOTALS, exposure.totals, strict=True))
        rec = experiment.current(view.user_id, window, self.k, None)
        if rec is None or not rec.items:
            view.problem = "no item of the window is still in the catalogue"
            return
        view.items = [ShownItem(i.item_id, i.score, i.reason, i.explained_by, None, i.team) for i in rec.items]

    def _shown(self, current: Recommendation, interests: np.ndarray) -> tuple[list[ShownItem], int]:
        count = len(interests)
        closest: Sequence[int | None] = [None] * len(current.items)
        if count > 1:
            vectors = self.events.recommender.item_vectors([i.item_id for i in current.items])
            closest = [
                int(np.argmax(interests @ vectors[i.item_id])) if i.item_id in vectors else None for i in current.items
            ]
        items = [
            ShownItem(i.item_id, i.score, i.reason, i.explained_by, interest)
            for i, interest in zip(current.items, closest, strict=True)
        ]
        return items, count

    def _changes(self, user_id: str, window: UserWindow) -> list[ListChange]:
        recommender = self.events.recommender
        recent = window.entries[-(CHANGES_SHOWN + 1) :]
        lists = []
        for entry in recent:
            then = window.as_of(entry.event_id)
            rec = recommender.current(user_id, then, self.k) if then is not None else None
            lists.append((entry, [i.item_id for i in rec.items] if rec else None))
        changes = [
            ListChange(entry, [i for i in after if i not in before], [i for i in before if i not in after])
            for (_, before), (entry, after) in itertools.pairwise(lists)
            if before is not None and after is not None
        ]
        return list(reversed(changes))

    def _payloads(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        recommender = self.events.recommender
        return recommender.store.fetch_payloads(recommender.items_collection, list(item_ids), _ITEM_FIELDS)
