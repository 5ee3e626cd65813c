"""Who sees which variant, and how two rankings are interleaved into one list.

A user's variant is a salted hash of their id, the same on every worker, after restarts and
rebalances and in the HTTP API: no table of assignments to keep or lose. Ids are hashed as
the events carry them, so a pseudonymised deployment assigns the same users the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from streams.experiments.config import ExperimentConfig, VariantConfig

_SPACE = 2**64


def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) from the parts (blake2b: stable across processes and Python versions)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPACE


def variant_of(experiment: ExperimentConfig, user_id: str) -> VariantConfig:
    """The variant ``user_id`` is assigned to: the shares cut [0, 1) into consecutive ranges."""
    total = sum(v.share for v in experiment.variants)
    point = unit_hash(experiment.assignment_salt, user_id) * total
    upper = 0.0
    for variant in experiment.variants:
        upper += variant.share
        if point < upper and variant.share > 0:
            return variant
    return next(v for v in reversed(experiment.variants) if v.share > 0)  # rounding at the very top


def team_draft(first: Sequence[str], second: Sequence[str], k: int, coin: float) -> list[tuple[str, int]]:
    """Team-draft interleaving (Radlinski et al., 2008): up to ``k`` items, each with its team (0: ``first``,
    1: ``second``).

    In each round the team with fewer picks (a coin decides ties; ``coin`` in [0, 1) seeds it) adds its
    best item not yet in the list. Credit for a click goes to the team that placed the item, so each
    ranker is judged only by the items it chose, on the same user at the same moment.
    """
    rankings = (list(first), list(second))
    picked: list[tuple[str, int]] = []
    taken: set[str] = set()
    counts = [0, 0]
    positions = [0, 0]
    flips = int(coin * _SPACE)  # one bit per tie, from the seed
    while len(picked) < k:
        open_teams = [t for t in (0, 1) if _next_free(rankings[t], positions[t], taken) is not None]
        if not open_teams:
            break
        if len(open_teams) == 1:
            team = open_teams[0]
        elif counts[0] != counts[1]:
            team = 0 if counts[0] < counts[1] else 1
        else:
            team, flips = flips & 1, flips >> 1
        position = _next_free(rankings[team], positions[team], taken)
        assert position is not None
        item = rankings[team][position]
        positions[team] = position + 1
        picked.append((item, team))
        taken.add(item)
        counts[team] += 1
    return picked


def _next_free(ranking: list[str], start: int, taken: set[str]) -> int | None:
    for position in range(start, len(ranking)):
        if ranking[position] not in taken:
            return position
    return None
