"""Training data for the interest encoder: per-user histories over a catalogue. No torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class History:
    """One user's events, oldest first: catalogue indices, type names, event times."""

    items: np.ndarray  # int64 [n]
    types: Sequence[str]
    ts_ms: np.ndarray  # int64 [n]


@dataclass
class TrainingData:
    item_ids: list[str]
    item_vectors: np.ndarray  # float32 [n_items, item_dim], unit rows
    histories: list[History]
    description: dict[str, object] = field(default_factory=dict)
