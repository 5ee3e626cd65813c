"""Ranking metrics for leave-one-out next-item evaluation with full ranking.

A target's rank is known up to ties: ``greater`` items score above it and
``ties`` others score the same. Metrics are their expectation under a random
order among tied items, so a method that scores many items equally (popularity,
co-occurrence) is neither flattered nor punished by how a sort breaks ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CUTOFFS = (10, 20)
# Targets grouped by how often they occur in training: where the encoder and co-occurrence differ most.
POPULARITY_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, 99), (100, 499), (500, None))


@dataclass(frozen=True)
class RankCounts:
    greater: np.ndarray  # int64 [n]: items scored above the target
    ties: np.ndarray  # int64 [n]: other items scored exactly like it

    @classmethod
    def from_scores(cls, scores: np.ndarray, targets: Sequence[int], exclude: Sequence[np.ndarray]) -> RankCounts:
        """``scores`` [n, n_items]; each row's ``exclude`` items (its history) leave the ranking,
        unless one of them is the target itself."""
        rows = np.arange(len(targets))
        target_array = np.asarray(targets, dtype=np.int64)
        target_scores = scores[rows, target_array].copy()
        scores = without(scores, exclude)
        scores[rows, target_array] = target_scores
        greater = (scores > target_scores[:, None]).sum(axis=1)
        ties = (scores == target_scores[:, None]).sum(axis=1) - 1
        return cls(greater.astype(np.int64), ties.astype(np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence[RankCounts]) -> RankCounts:
        return cls(np.concatenate([p.greater for p in parts]), np.concatenate([p.ties for p in parts]))

    def __len__(self) -> int:
        return len(self.greater)

    def subset(self, keep: np.ndarray) -> RankCounts:
        return RankCounts(self.greater[keep], self.ties[keep])


def without(scores: np.ndarray, exclude: Sequence[np.ndarray]) -> np.ndarray:
    """A copy of ``scores`` with each row's excluded items at -inf."""
    out = np.array(scores, dtype=np.float32 if scores.dtype == np.float32 else np.float64, copy=True)
    rows = np.repeat(np.arange(len(exclude)), [len(items) for items in exclude])
    out[rows, np.concatenate(exclude) if len(exclude) else np.zeros(0, dtype=np.int64)] = -np.inf
    return out


def _expected(gain: np.ndarray, counts: RankCounts) -> np.ndarray:
    """Mean of gain[r] over r in [greater, greater + ties] (gain 0 beyond its length)."""
    cumulative = np.concatenate([[0.0], np.cumsum(gain)])
    last = len(gain)
    low = np.minimum(counts.greater, last)
    high = np.minimum(counts.greater + counts.ties + 1, last)
    return (cumulative[high] - cumulative[low]) / (counts.ties + 1)


def per_example(counts: RankCounts, k: int) -> dict[str, np.ndarray]:
    ranks = np.arange(k)
    return {
        f"hr@{k}": _expected(np.ones(k), counts),
        f"ndcg@{k}": _expected(1.0 / np.log2(ranks + 2.0), counts),
    }


def in_bucket(values: np.ndarray, low: int, high: int | None) -> np.ndarray:
    """Which ``values`` lie in [low, high] (no upper bound when ``high`` is None)."""
    return (values >= low) & (values <= (high if high is not None else np.iinfo(np.int64).max))


def expected_rank(counts: RankCounts) -> np.ndarray:
    """Each target's rank (1 = first) at the middle of its ties."""
    return counts.greater + counts.ties / 2.0 + 1.0


def reciprocal_rank(counts: RankCounts) -> np.ndarray:
    longest = int((counts.greater + counts.ties).max(initial=0)) + 1
    return _expected(1.0 / np.arange(1, longest + 1), counts)


def summarize(counts: RankCounts, prefix: str = "") -> dict[str, float]:
    """HR@k (= Recall@k with one target), NDCG@k for k in 10 and 20, and MRR, averaged over examples."""
    if not len(counts):
        raise ValueError("no examples to summarize")
    out = {}
    for k in CUTOFFS:
        for name, values in per_example(counts, k).items():
            out[prefix + name] = float(values.mean())
    out[prefix + "mrr"] = float(reciprocal_rank(counts).mean())
    out[prefix + "users"] = float(len(counts))
    return out


def top_k(scores: np.ndarray, exclude: Sequence[np.ndarray], k: int) -> np.ndarray:
    """The k best items per row after removing each row's excluded items: int64 [n, k], best first."""
    scores = without(scores, exclude)
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


def coverage(lists: np.ndarray, n_items: int) -> float:
    """Share of the catalogue that appears in at least one list."""
    return float(len(np.unique(lists)) / n_items)


def intra_list_diversity(lists: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance inside each list, averaged over lists."""
    unit = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
    vectors = unit[lists]  # [n, k, d]
    similarity = vectors @ vectors.transpose(0, 2, 1)  # [n, k, k]
    k = lists.shape[1]
    pairs = k * (k - 1)
    return float(((pairs - (similarity.sum(axis=(1, 2)) - np.trace(similarity, axis1=1, axis2=2))) / pairs).mean())
