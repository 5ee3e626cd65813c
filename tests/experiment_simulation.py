"""Simulated experiments through the real attribution, assignment, interleaving and statistics code.

Users differ a lot: some find what they want in almost any list, others in none (a U-shaped
difficulty), and they come back a different number of times. Each visit, a ranker's list holds the
item the user is after with probability ``quality * difficulty`` (at a random rank), and the user
then clicks that item. An A/B split sends each user's visits to one ranker; interleaving drafts both
rankers' lists into one. The verdict is read from the same report code operators use.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams.experiments.assignment import team_draft, unit_hash, variant_of
from streams.experiments.attribution import CountsDelta, ExperimentCounts, UserExposure
from streams.experiments.config import ExperimentConfig, VariantConfig
from streams.experiments.report import Timeline, experiment_report
from streams.experiments.stats import preference
from streams.records import Event, Recommendation, RecommendedItem

K = 10
N_ITEMS = 1_000
VISIT_MS = 60_000
WINDOW_MS = 1_800_000


@dataclass(frozen=True)
class Rankers:
    first_quality: float  # the control's
    second_quality: float

    def experiment(self, seed: int, interleave: bool = False) -> ExperimentConfig:
        variants = (VariantConfig("first", 50), VariantConfig("second", 50))
        return ExperimentConfig(f"sim-{seed}", variants, salt=f"sim-{seed}", interleave=interleave)


def _list(rng: random.Random, target: int, hit_probability: float) -> list[str]:
    items = [f"i{n}" for n in rng.sample(range(N_ITEMS), K + 1) if n != target][:K]
    if rng.random() < hit_probability:
        items[rng.randrange(K)] = f"i{target}"
    return items


def _visits(rng: random.Random) -> int:
    visits = 1
    while rng.random() < 0.75:  # geometric: 4 visits on average, some users many more
        visits += 1
    return visits


def _received(user: str, items: list[str], teams: list[str | None], ts: int) -> Recommendation:
    shown = tuple(RecommendedItem(item, 1.0, "", (), team) for item, team in zip(items, teams, strict=True))
    return Recommendation(user, shown, "sim", f"{user}-{ts}", ts, ts)


def run_ab(rankers: Rankers, users: int, seed: int, looks: int = 1) -> dict[str, Any]:
    """An A/B split of ``users``, arriving over ``looks`` report buckets; the report of it."""
    rng = random.Random(seed)
    experiment = rankers.experiment(seed)
    quality = {"first": rankers.first_quality, "second": rankers.second_quality}
    timeline = Timeline(experiment.name)
    for look in range(looks):
        delta = CountsDelta()
        for n in range(look * users // looks, (look + 1) * users // looks):
            user = f"u{n}"
            variant = variant_of(experiment, user).name
            difficulty = rng.betavariate(0.5, 0.5)
            exposure = UserExposure(experiment.name, variant)
            for visit in range(_visits(rng)):
                ts = visit * VISIT_MS
                target = rng.randrange(N_ITEMS)
                items = _list(rng, target, quality[variant] * difficulty)
                exposure.record(_received(user, items, [None] * K, ts), [-1] * K, WINDOW_MS)
                exposure.credit(Event(f"{user}-{visit}", user, f"i{target}", "click", ts + 1_000), WINDOW_MS)
            delta.move(variant, None, exposure.totals)
        counts = ExperimentCounts(experiment.name, look * 3_600_000)
        counts.add(delta)
        timeline.add(counts)
    return experiment_report(timeline, ["first", "second"])


def run_interleaved(rankers: Rankers, users: int, seed: int) -> dict[str, Any]:
    """Both rankers interleaved for every user; the users' preferences as the report tests them."""
    rng = random.Random(seed)
    experiment = rankers.experiment(seed, interleave=True)
    names = ["first", "second"]
    delta = CountsDelta()
    for n in range(users):
        user = f"u{n}"
        difficulty = rng.betavariate(0.5, 0.5)
        exposure = UserExposure(experiment.name, "first+second")
        for visit in range(_visits(rng)):
            ts = visit * VISIT_MS
            target = rng.randrange(N_ITEMS)
            first = _list(rng, target, rankers.first_quality * difficulty)
            second = _list(rng, target, rankers.second_quality * difficulty)
            drafted = team_draft(first, second, K, unit_hash(experiment.assignment_salt, user, str(visit)))
            items, teams = [item for item, _ in drafted], [team for _, team in drafted]
            exposure.record(_received(user, items, [names[t] for t in teams], ts), teams, WINDOW_MS)
            exposure.credit(Event(f"{user}-{visit}", user, f"i{target}", "click", ts + 1_000), WINDOW_MS)
        delta.prefer(None, exposure.preference())
    chosen = preference(delta.preferences)
    return {"p_value": chosen.p_value, "first_share": chosen.first_share, **dataclasses.asdict(chosen)}


def ab_finds(rankers: Rankers, users: int, seed: int) -> bool:
    """Whether the A/B split declares the better ranker better (hit rate, p < 0.05)."""
    versus = run_ab(rankers, users, seed)["variants"]["second"]["hit_rate"]["vs_control"]
    better_second = rankers.second_quality > rankers.first_quality
    return bool(
        versus["p_value"] is not None and versus["p_value"] < 0.05 and (versus["difference"] > 0) == better_second
    )


def interleaving_finds(rankers: Rankers, users: int, seed: int) -> bool:
    chosen = run_interleaved(rankers, users, seed)
    better_first = rankers.first_quality > rankers.second_quality
    p, share = chosen["p_value"], chosen["first_share"]
    return bool(isinstance(p, float) and p < 0.05 and isinstance(share, float) and (share > 0.5) == better_first)


def users_needed(
    found: Callable[[Rankers, int, int], bool], rankers: Rankers, sizes: list[int], seeds: int, power: float = 0.8
) -> int | None:
    """The fewest users (of ``sizes``) with which ``found`` reaches the verdict in ``power`` of the seeds."""
    for size in sizes:
        share = np.mean([found(rankers, size, seed) for seed in range(seeds)])
        if share >= power:
            return size
    return None
