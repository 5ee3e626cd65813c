"""Re-ranking: from the store's nearest candidates to the list a user sees.

Retrieval ranks by the model's score alone. These tunable preferences change the
order of an over-fetched candidate list (``RerankPolicy.candidates`` deep):

- feedback: the search is steered away from what the user rejected (disliked, skipped or
  returned, in their window): ``dislike_penalty`` times the mean direction of the rejected
  items is taken off the query (Rocchio), so candidates beyond them are fetched at all;
  and a candidate loses ``dislike_penalty`` of relevance per unit of cosine similarity
  to a rejected item, so what resembles a rejection sinks; and with
  ``bought_duplicate_similarity`` set, candidates at least that similar to an item the
  user bought are left out (near-duplicates of a purchase);
- freshness: a candidate's relevance is halved for every ``freshness_half_life_s`` of
  its catalogue age (from the item's ``ts`` to the user's event), so new items surface sooner;
- diversity: maximal marginal relevance (MMR) picks, one by one, the candidate with the
  best ``(1 - diversity) * relevance - diversity * (its highest cosine similarity to an
  item already picked)``, so one near-duplicate cluster cannot fill the list.

Relevance is the model's score rescaled to [0, 1] over the candidates, so that the
trade-offs mean the same for every user. For a user with no rejection (and with
freshness, diversity and duplicate suppression off, their defaults), the list is the
store's top k, unchanged, and nothing is over-fetched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from streams.ports import SearchHit


@dataclass(frozen=True)
class Feedback:
    """Vectors of the items a user rejected (disliked, skipped, returned) and bought ([n, dim] each)."""

    rejected: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    bought: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


NO_FEEDBACK = Feedback()


@dataclass(frozen=True)
class RerankPolicy:
    """How a user's candidates are re-ranked. Built from validated settings (``Settings.rerank_policy``),
    where each value's bounds are declared once."""

    diversity: float = 0.0  # 0: relevance only; towards 1: each pick avoids what is already picked
    freshness_half_life_s: float = 0.0  # 0: catalogue age does not matter
    candidates: int = 50  # how deep to fetch when re-ranking is on
    dislike_penalty: float = 0.5  # relevance lost per unit of cosine similarity to a rejected item
    bought_duplicate_similarity: float = 0.0  # leave out candidates this similar to a bought item (0: off)

    def active(self, feedback: Feedback = NO_FEEDBACK) -> bool:
        """Whether this user's list is re-ranked (and so fetched deeper than k)."""
        return (
            self.diversity > 0
            or self.freshness_half_life_s > 0
            or (self.dislike_penalty > 0 and len(feedback.rejected) > 0)
            or (self.bought_duplicate_similarity > 0 and len(feedback.bought) > 0)
        )

    def fetch_limit(self, k: int, feedback: Feedback = NO_FEEDBACK) -> int:
        return max(k, self.candidates) if self.active(feedback) else k

    def query(self, user_vector: np.ndarray, feedback: Feedback = NO_FEEDBACK) -> np.ndarray:
        """The vector to search with: the user's, steered away from what they rejected."""
        if self.dislike_penalty == 0 or not len(feedback.rejected):
            return user_vector
        away = _units(feedback.rejected).mean(axis=0)
        steered = user_vector - self.dislike_penalty * float(np.linalg.norm(user_vector)) * away
        return steered.astype(user_vector.dtype)


def merge_interests(lists: Sequence[Sequence[SearchHit]], limit: int) -> list[SearchHit]:
    """One candidate list from each interest's: every candidate at the score of the interest closest
    to it, best first. That is the ranking offline evaluation scores; a user whose interests both
    match strongly sees both, and an interest that matches nothing well takes no place from one that does.
    (Taking the interests' lists in turns instead gave a user of one interest half a list of noise.)"""
    best: dict[str, SearchHit] = {}
    for hits in lists:
        for hit in hits:
            if hit.id not in best or hit.score > best[hit.id].score:
                best[hit.id] = hit
    return sorted(best.values(), key=lambda hit: -hit.score)[:limit]


def relevance(
    hits: Sequence[SearchHit], unit: np.ndarray, policy: RerankPolicy, now_ms: int, feedback: Feedback
) -> np.ndarray:
    """Scores rescaled to [0, 1] over the candidates, decayed by catalogue age, lowered near rejections.

    ``unit``: the candidates' unit vectors (zero rows for those without a vector).
    """
    scores = np.array([h.score for h in hits], dtype=np.float64)
    spread = scores.max() - scores.min()
    rel = (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    if policy.freshness_half_life_s > 0:
        published = np.array([_published_ms(h, now_ms) for h in hits], dtype=np.float64)
        age_s = np.maximum(now_ms - published, 0) / 1000
        rel = rel * 0.5 ** (age_s / policy.freshness_half_life_s)
    if policy.dislike_penalty > 0 and len(feedback.rejected):
        resemblance = np.maximum(unit @ _units(feedback.rejected).T, 0).max(axis=1)
        rel = rel - policy.dislike_penalty * resemblance
    return rel


def rerank(
    hits: Sequence[SearchHit],
    vectors: Mapping[str, np.ndarray],
    k: int,
    policy: RerankPolicy,
    now_ms: int,
    feedback: Feedback = NO_FEEDBACK,
) -> list[SearchHit]:
    """The ``k`` hits to show, in order (``vectors``: item vectors of the hits, for similarity)."""
    if not policy.active(feedback) or not hits:
        return list(hits[:k])
    known = [vectors[h.id] for h in hits if h.id in vectors]
    dim = known[0].shape[0] if known else 1
    unit = np.stack([_unit(vectors.get(h.id), dim) for h in hits])
    rel = relevance(hits, unit, policy, now_ms, feedback)
    available = np.ones(len(hits), dtype=bool)
    if policy.bought_duplicate_similarity > 0 and len(feedback.bought):
        available &= (unit @ _units(feedback.bought).T).max(axis=1) < policy.bought_duplicate_similarity
    if policy.diversity == 0:
        order = [i for i in np.argsort(-rel, kind="stable") if available[i]]
        return [hits[i] for i in order[:k]]
    similarity = unit @ unit.T
    picked: list[int] = []
    closest = np.zeros(len(hits))  # each candidate's highest similarity to an item already picked
    while len(picked) < k and available.any():
        value = (1 - policy.diversity) * rel - policy.diversity * (closest if picked else 0.0)
        value = np.where(available, value, -np.inf)
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


def _units(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1)


def _published_ms(hit: SearchHit, now_ms: int) -> float:
    ts = hit.payload.get("ts")
    return float(ts) if isinstance(ts, int | float) else float(now_ms)
