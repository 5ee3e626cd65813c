"""Re-ranking: from the store's nearest candidates to the list a user sees.

Retrieval ranks by the model's score alone. Two tunable preferences change the order
of an over-fetched candidate list (``RerankPolicy.candidates`` deep):

- freshness: a candidate's relevance is halved for every ``freshness_half_life_s`` of
  its catalogue age (the item's ``ts``), so new items surface sooner;
- diversity: maximal marginal relevance (MMR) picks, one by one, the candidate with the
  best ``(1 - diversity) * relevance - diversity * (its highest cosine similarity to an
  item already picked)``, so one near-duplicate cluster cannot fill the list.

Relevance is the model's score rescaled to [0, 1] over the candidates, so that the
trade-off means the same for every user. With both off (the defaults), the list is
the store's top k, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from streams.ports import SearchHit


@dataclass(frozen=True)
class RerankPolicy:
    diversity: float = 0.0  # 0: relevance only; towards 1: each pick avoids what is already picked
    freshness_half_life_s: float = 0.0  # 0: catalogue age does not matter
    candidates: int = 50  # how deep to fetch when re-ranking is on

    def __post_init__(self) -> None:
        if not 0.0 <= self.diversity < 1.0:
            raise ValueError(f"diversity must be in [0, 1), got {self.diversity}")
        if self.freshness_half_life_s < 0:
            raise ValueError(f"freshness half-life must be >= 0, got {self.freshness_half_life_s}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")

    @property
    def active(self) -> bool:
        return self.diversity > 0 or self.freshness_half_life_s > 0

    def fetch_limit(self, k: int) -> int:
        return max(k, self.candidates) if self.active else k


def relevance(hits: Sequence[SearchHit], policy: RerankPolicy, now_ms: int) -> np.ndarray:
    """Scores rescaled to [0, 1] over the candidates, then decayed by catalogue age."""
    scores = np.array([h.score for h in hits], dtype=np.float64)
    spread = scores.max() - scores.min()
    rel = (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    if policy.freshness_half_life_s > 0:
        published = np.array([_published_ms(h, now_ms) for h in hits], dtype=np.float64)
        age_s = np.maximum(now_ms - published, 0) / 1000
        rel = rel * 0.5 ** (age_s / policy.freshness_half_life_s)
    return rel


def rerank(
    hits: Sequence[SearchHit],
    vectors: Mapping[str, np.ndarray],
    k: int,
    policy: RerankPolicy,
    now_ms: int,
) -> list[SearchHit]:
    """The ``k`` hits to show, in order (``vectors``: item vectors of the hits, for similarity)."""
    if not policy.active or not hits:
        return list(hits[:k])
    rel = relevance(hits, policy, now_ms)
    known = [vectors[h.id] for h in hits if h.id in vectors]
    if policy.diversity == 0 or not known:
        order = np.argsort(-rel, kind="stable")[:k]
        return [hits[i] for i in order]
    dim = known[0].shape[0]
    unit = np.stack([_unit(vectors.get(h.id), dim) for h in hits])
    similarity = unit @ unit.T
    picked: list[int] = []
    closest = np.full(len(hits), -np.inf)  # each candidate's highest similarity to a picked item
    available = np.ones(len(hits), dtype=bool)
    for _ in range(min(k, len(hits))):
        redundancy = np.where(np.isfinite(closest), closest, 0.0)
        value = (1 - policy.diversity) * rel - policy.diversity * redundancy
        value[~available] = -np.inf
        best = int(np.argmax(value))
        picked.append(best)
        available[best] = False
        closest = np.maximum(closest, similarity[best])
    return [hits[i] for i in picked]


def _unit(vector: np.ndarray | None, dim: int) -> np.ndarray:
    if vector is None:  # an item without a vector (deleted meanwhile) is similar to nothing
        return np.zeros(dim)
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def _published_ms(hit: SearchHit, now_ms: int) -> float:
    ts = hit.payload.get("ts")
    return float(ts) if isinstance(ts, int | float) else float(now_ms)
