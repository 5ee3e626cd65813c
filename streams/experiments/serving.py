"""A running experiment in the stream: each user's list made by their variant, stamped with it, and the
events that follow credited to it (``streams.experiments.attribution``).

A variant makes lists in one of three ways (``VariantLists``): the served model with its own re-ranking
settings, a model of its own loaded beside the served one, or the popularity list. Interleaved, every
user gets one list drafted from both variants' lists, each item stamped with the team that placed it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streams.errors import InvalidRecord
from streams.experiments.assignment import team_draft, unit_hash, variant_of
from streams.experiments.attribution import TOTALS, CountsDelta, ExperimentCounts, UserExposure, counts_key
from streams.experiments.config import ExperimentConfig
from streams.item_vectors import ItemVectors
from streams.metrics import WorkerMetrics
from streams.ports import ItemFilter
from streams.recommend import Recommender, RefreshRequest
from streams.records import Event, Recommendation, RecommendedItem
from streams.rerank import RerankPolicy
from streams.state import UserWindow
from streams.trending import POPULAR_REASON, SHOWN_FIELDS, PartitionedTrending, shown_popular

log = logging.getLogger(__name__)

TRENDING_MODEL = "trending"
POPULAR_DEPTH = 200  # popular items looked at for the popularity lists of a micro-batch


class VariantLists(Protocol):
    """How a variant makes its lists: a micro-batch's, and one user's now (for the HTTP API)."""

    def lists(self, requests: Sequence[RefreshRequest], vectors: ItemVectors) -> list[Recommendation]: ...

    def current(self, user_id: str, window: UserWindow, k: int, rules: ItemFilter | None) -> Recommendation | None: ...


@dataclass
class ModelLists:
    """An interest encoder's lists: the served model's (``own_model`` False: it follows model swaps, and the
    batch's item vectors are its own) or a model loaded for the variant, with its re-ranking settings."""

    recommender: Recommender
    policy: RerankPolicy
    own_model: bool = False

    def lists(self, requests: Sequence[RefreshRequest], vectors: ItemVectors) -> list[Recommendation]:
        if self.own_model:  # its item tower has its own vectors
            vectors = self.recommender.item_vectors(list({e.item_id for r in requests for e in r.window.entries}))
        return self.recommender.refresh_batch(requests, vectors, self.policy)

    def current(self, user_id: str, window: UserWindow, k: int, rules: ItemFilter | None) -> Recommendation | None:
        return self.recommender.current(user_id, window, k, rules, self.policy)


@dataclass
class PopularLists:
    """The popularity baseline: what is trending in this worker's partitions, less what the user already has."""

    trending: PartitionedTrending
    served: Recommender  # for the store, the items collection, the business rules and the clock

    def lists(self, requests: Sequence[RefreshRequest], vectors: ItemVectors) -> list[Recommendation]:
        k = self.served.top_k
        longest = max((len(r.window) for r in requests), default=0)
        ranked, payloads = self._ranked(POPULAR_DEPTH + longest)
        rules = self.served.rules_for(None)
        return [
            self._recommendation(
                r.user_id, r.trigger, r.event_ids, shown_popular(ranked, payloads, rules, k, r.window.item_ids)
            )
            for r in requests
        ]

    def current(self, user_id: str, window: UserWindow, k: int, rules: ItemFilter | None) -> Recommendation | None:
        if not window.entries:
            return None
        ranked, payloads = self._ranked(max(POPULAR_DEPTH, 10 * k) + len(window))
        newest = window.entries[-1]
        trigger = Event(newest.event_id, user_id, newest.item_id, newest.type, newest.ts)
        shown = shown_popular(ranked, payloads, self.served.rules_for(rules), k, window.item_ids)
        return self._recommendation(user_id, trigger, (), shown)

    def _ranked(self, depth: int) -> tuple[list[tuple[str, float]], dict[str, dict[str, object]]]:
        ranked = self.trending.top(depth)
        payloads = self.served.store.fetch_payloads(
            self.served.items_collection, [i for i, _ in ranked], list(SHOWN_FIELDS)
        )
        return ranked, payloads

    def _recommendation(
        self, user_id: str, trigger: Event, event_ids: tuple[str, ...], shown: list[tuple[str, float]]
    ) -> Recommendation:
        return Recommendation(
            user_id=user_id,
            items=tuple(RecommendedItem(item_id, round(score, 6), POPULAR_REASON) for item_id, score in shown),
            model=TRENDING_MODEL,
            trigger_event_id=trigger.event_id,
            event_ts=trigger.ts,
            emitted_ts=self.served.clock(),
            event_ids=event_ids,
        )


@dataclass(frozen=True)
class CountsUpdate:
    """A micro-batch's change to one (partition, report bucket) record of an experiment's counts."""

    key: bytes
    partition: int
    experiment: str
    bucket_start_ms: int
    delta: CountsDelta

    def applied_to(self, stored: bytes | None) -> bytes:
        counts = ExperimentCounts(self.experiment, self.bucket_start_ms)
        if stored is not None:
            try:
                counts = ExperimentCounts.from_bytes(stored)
            except InvalidRecord as exc:
                log.error("experiment counts %r are unreadable (%s); counting this bucket afresh", self.key, exc.reason)
        counts.add(self.delta)
        return counts.to_bytes()


@dataclass
class _Tally:
    """The counts updates of one micro-batch, by (partition, report bucket)."""

    config: ExperimentConfig
    updates: dict[tuple[int, int], CountsDelta] = field(default_factory=dict)

    def delta(self, partition: int, ts: int) -> CountsDelta:
        bucket_ms = int(self.config.report_bucket_s * 1000)
        return self.updates.setdefault((partition, ts // bucket_ms * bucket_ms), CountsDelta())

    def done(self) -> list[CountsUpdate]:
        name = self.config.name
        return [CountsUpdate(counts_key(name, p, b), p, name, b, d) for (p, b), d in self.updates.items()]


class RunningExperiment:
    """Serves every user from their variant (or the interleaving of both) and credits what follows."""

    def __init__(
        self, config: ExperimentConfig, variants: Mapping[str, VariantLists], metrics: WorkerMetrics, top_k: int
    ) -> None:
        self.config = config
        self.variants = dict(variants)
        self.metrics = metrics
        self.top_k = top_k
        self.window_ms = int(config.attribution_window_s * 1000)
        self.teams = {v.name: n for n, v in enumerate(config.variants)} if config.interleave else {}

    @property
    def name(self) -> str:
        return self.config.name

    def label(self, user_id: str) -> str:
        """The variant a user's lists are stamped with: theirs, or "a+b" when interleaved."""
        if self.config.interleave:
            return "+".join(v.name for v in self.config.variants)
        return variant_of(self.config, user_id).name

    # ------------------------------------------------------------ lists

    def lists(self, requests: Sequence[RefreshRequest], vectors: ItemVectors) -> list[Recommendation]:
        if self.config.interleave:
            first, second = (self.variants[v.name].lists(requests, vectors) for v in self.config.variants)
            return self._interleaved(first, second)
        by_variant: dict[str, list[RefreshRequest]] = {}
        for request in requests:
            by_variant.setdefault(variant_of(self.config, request.user_id).name, []).append(request)
        return [
            self._stamped(rec, name)
            for name, chosen in by_variant.items()
            for rec in self.variants[name].lists(chosen, vectors)
        ]

    def current(self, user_id: str, window: UserWindow, k: int, rules: ItemFilter | None) -> Recommendation | None:
        if not self.config.interleave:
            name = variant_of(self.config, user_id).name
            rec = self.variants[name].current(user_id, window, k, rules)
            return None if rec is None else self._stamped(rec, name)
        first, second = (self.variants[v.name].current(user_id, window, k, rules) for v in self.config.variants)
        return next(iter(self._interleaved([first] if first else [], [second] if second else [], k)), None)

    def _stamped(self, rec: Recommendation, variant: str) -> Recommendation:
        return dataclasses.replace(rec, experiment=self.config.name, variant=variant)

    def _interleaved(
        self, first: Sequence[Recommendation], second: Sequence[Recommendation], k: int | None = None
    ) -> list[Recommendation]:
        names = [v.name for v in self.config.variants]
        seconds = {rec.user_id: rec for rec in second}
        merged = []
        for rec in first:
            other = seconds.pop(rec.user_id, None)
            merged.append(self._drafted(rec, other, names, k or self.top_k))
        merged += [self._drafted(rec, None, names[::-1], k or self.top_k) for rec in seconds.values()]
        return merged

    def _drafted(self, rec: Recommendation, other: Recommendation | None, names: list[str], k: int) -> Recommendation:
        """``rec`` and ``other`` team-draft interleaved (``names``: their variants), the draw seeded by the
        user and the trigger, so that a replay drafts the same list."""
        rankings = (rec.items, other.items if other else ())
        coin = unit_hash(self.config.assignment_salt, rec.user_id, rec.trigger_event_id)
        drafted = team_draft([i.item_id for i in rankings[0]], [i.item_id for i in rankings[1]], k, coin)
        by_id = [{i.item_id: i for i in ranking} for ranking in rankings]
        items = tuple(dataclasses.replace(by_id[team][item], team=names[team]) for item, team in drafted)
        models = rec.model if other is None else f"{rec.model}+{other.model}"
        return dataclasses.replace(
            rec, items=items, model=models, experiment=self.config.name, variant=self.label(rec.user_id)
        )

    # ------------------------------------------------------------ attribution

    def attribute(
        self,
        windows: Mapping[str, UserWindow],
        fresh: Sequence[Event],
        sent: Sequence[Recommendation],
        replayed: set[str],
        partition_of: Mapping[str, int],
    ) -> list[CountsUpdate]:
        """Credit the batch's new events to the lists before them, then remember the lists just sent, in the
        users' windows. ``replayed``: users whose lists answer redelivered events (already counted).
        Returns the changes to the counts."""
        tally = _Tally(self.config)
        new_events: dict[str, list[Event]] = {}
        for event in fresh:
            new_events.setdefault(event.user_id, []).append(event)
        lists = {rec.user_id: rec for rec in sent if rec.user_id not in replayed}
        for user_id in new_events.keys() | lists.keys():
            window = windows[user_id]
            before = self.exposure_of(user_id, window)
            if before is None and user_id not in lists:
                continue  # not in the experiment until their first list
            exposure = before or UserExposure(self.config.name, self.label(user_id))
            totals, preference = list(exposure.totals), exposure.preference()
            team_credits = list(exposure.team_credits)
            for event in sorted(new_events.get(user_id, ()), key=lambda e: e.ts):
                exposure.credit(event, self.window_ms)
            rec = lists.get(user_id)
            if rec is not None:
                exposure.record(rec, [self.teams.get(i.team or "", -1) for i in rec.items], self.window_ms)
            window.experiment = exposure.to_bytes()
            when = rec.event_ts if rec is not None else max(e.ts for e in new_events[user_id])
            delta = tally.delta(partition_of[user_id], when)
            delta.move(exposure.variant, totals if before else None, exposure.totals)
            if self.teams:
                delta.prefer(preference, exposure.preference())
            self._count(exposure, totals if before else None, team_credits)
        return tally.done()

    def forget(self, window: UserWindow, user_id: str, ts: int, partition: int) -> list[CountsUpdate]:
        """Take a user about to be forgotten out of the counts (their state goes with their window)."""
        exposure = self.exposure_of(user_id, window)
        if exposure is None:
            return []
        tally = _Tally(self.config)
        delta = tally.delta(partition, ts)
        delta.move(exposure.variant, exposure.totals, None)
        if self.teams:
            delta.prefer(exposure.preference(), None)
        return tally.done()

    def exposure_of(self, user_id: str, window: UserWindow) -> UserExposure | None:
        """The user's state in this experiment and their current variant, if they have one."""
        if not window.experiment:
            return None
        try:
            exposure = UserExposure.from_bytes(window.experiment)
        except InvalidRecord as exc:
            log.error("a user's experiment state is unreadable (%s); they start the experiment afresh", exc.reason)
            return None
        if exposure.experiment != self.config.name or exposure.variant != self.label(user_id):
            return None  # another experiment, or shares changed: what they did there stays counted there
        return exposure

    def _count(self, exposure: UserExposure, before: list[float] | None, team_credits: list[int]) -> None:
        counter = self.metrics.experiment
        name, variant = self.config.name, exposure.variant
        if before is None:
            counter.labels(name, variant, "users").inc()
        change = np.asarray(exposure.totals) - np.asarray(before or [0.0] * len(TOTALS))
        for total, amount in zip(TOTALS, change.tolist(), strict=True):
            if amount > 0:
                counter.labels(name, variant, total).inc(amount)
        for team, (now, then) in enumerate(zip(exposure.team_credits, team_credits, strict=True)):
            if now > then:
                counter.labels(name, self.config.variants[team].name, "team_hits").inc(now - then)
