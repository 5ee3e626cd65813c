"""Simple baselines, fitted on the same training sequences and scored by the same code as the model
(with ``refit``, like a refit model, on the training sequences extended by the validation targets).

- popularity: how often each item occurs in training.
- recency-weighted popularity: each occurrence weighs 0.5 ** (age / half-life); the age is
  the time before the newest training event when the data has times, else the number of
  later events in the same user's sequence.
- item co-occurrence (item-kNN): items that follow each other within a few steps in
  training sequences, cosine-normalised; a user's score sums the rows of their
  newest items, each weighted by how recent it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from scipy import sparse

from encoder.data import Dataset, History

DAY_MS = 86_400_000


class Scorer(Protocol):
    name: str

    def scores(self, histories: Sequence[History]) -> np.ndarray:
        """[len(histories), n_items] scores; higher ranks first."""
        ...


class Popularity:
    name = "popularity"

    def __init__(self, dataset: Dataset, refit: bool = False) -> None:
        self.counts = dataset.occurrences(refit).astype(np.float64)

    def scores(self, histories: Sequence[History]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts)))


class RecentPopularity(Popularity):
    name = "recency-weighted popularity"

    def __init__(
        self, dataset: Dataset, refit: bool = False, half_life_days: float = 30.0, half_life_steps: float = 10.0
    ) -> None:
        counts = np.zeros(dataset.n_items)
        sequences = dataset.training_sequences(refit)
        newest = max((int(h.ts_ms[-1]) for h in sequences if len(h)), default=0)
        for history in sequences:
            if dataset.has_time:
                age = (newest - history.ts_ms).astype(np.float64) / (half_life_days * DAY_MS)
            else:
                age = np.arange(len(history) - 1, -1, -1, dtype=np.float64) / half_life_steps
            np.add.at(counts, history.items, 0.5**age)
        self.counts = counts


class ItemCooccurrence:
    name = "item co-occurrence (item-kNN)"

    def __init__(self, dataset: Dataset, refit: bool = False, span: int = 3, newest: int = 5) -> None:
        rows, cols, weights = [], [], []
        for history in dataset.training_sequences(refit):
            items = history.items
            for step in range(1, span + 1):
                if len(items) > step:
                    rows.append(items[:-step])
                    cols.append(items[step:])
                    weights.append(np.full(len(items) - step, 1.0 / step))
        n = dataset.n_items
        if rows:
            pairs = sparse.coo_matrix(
                (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
            ).tocsr()
            pairs = pairs + 0.5 * pairs.T  # what follows counts most; what precedes, half
        else:
            pairs = sparse.csr_matrix((n, n))
        occurrences = np.asarray(pairs.sum(axis=1)).ravel() + 1.0
        norm = sparse.diags(1.0 / np.sqrt(occurrences))
        self.similarity = (norm @ pairs @ norm).tocsr()
        self.newest = newest
        self.n_items = n

    def scores(self, histories: Sequence[History]) -> np.ndarray:
        out = np.zeros((len(histories), self.n_items))
        for row, history in enumerate(histories):
            recent = history.items[-self.newest :][::-1]
            weights = 0.5 ** np.arange(len(recent))
            out[row] = self.similarity[recent].T @ weights
        return out


def baselines(dataset: Dataset, refit: bool = False) -> list[Scorer]:
    return [Popularity(dataset, refit), RecentPopularity(dataset, refit), ItemCooccurrence(dataset, refit)]
