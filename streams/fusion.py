"""One list from two signals: the interest encoder's score, raised by item co-occurrence.

The encoder ranks what fits a user's interests; co-occurrence knows which items people reach
right after the ones this user just touched, which is what the encoder learns worst: items seen
a few times in training (``streams.cooccurrence``). A candidate's fused score is

    encoder score + weight * log(1 + co-occurrence score / floor)

over the union of the encoder's ``depth`` best items and co-occurrence's ``depth`` best, the
co-occurrence scores taken with the fusion's ``damping`` (``streams.cooccurrence``: how far rare
neighbours are lifted over popular ones). The weight, floor and damping are chosen on validation
targets when the model is trained (``encoder.fusion``) and travel in its bundle, so offline
evaluation and the stream apply the same fusion. An item outside both candidate lists cannot
enter the top ``depth`` (the encoder's own ``depth`` best outrank it), so the union gives the
same list as ranking the whole catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.cooccurrence import CooccurrenceSpec

MAX_DAMPING = 2.0  # a manifest's bound; training tries up to 0.5 (``encoder.fusion.DAMPINGS``)


@dataclass(frozen=True)
class Fusion:
    weight: float = 0.0  # 0: the encoder alone
    floor: float = 0.01  # the co-occurrence score at which an item gains log(2) * weight
    depth: int = 50  # candidates taken from each signal
    cooccurrence: CooccurrenceSpec = field(default_factory=CooccurrenceSpec)
    damping: float = 0.0  # co-occurrence's scoring (``Cooccurrence.scores``); 0: cosine as counted

    def __post_init__(self) -> None:
        if self.weight < 0 or self.floor <= 0 or self.depth < 1 or not 0 <= self.damping <= MAX_DAMPING:
            raise ValueError(f"invalid fusion {self}")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def fused(self, encoder_scores: np.ndarray, cooccurrence_scores: np.ndarray) -> np.ndarray:
        """The fused scores of items (encoder score + what co-occurrence adds), for arrays or single scores."""
        return encoder_scores + self.weight * np.log1p(cooccurrence_scores / self.floor)

    def to_dict(self) -> dict[str, object]:
        own = {"weight": self.weight, "floor": self.floor, "depth": self.depth, "damping": self.damping}
        return own | self.cooccurrence.to_dict()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Fusion:
        """A fusion as ``to_dict`` wrote it (a bundle's manifest; one written before damping has none);
        ``ValueError`` for anything else."""
        own = {"weight", "floor", "depth", "damping"}
        try:
            spec = CooccurrenceSpec.from_dict({k: v for k, v in raw.items() if k not in own})
            damping = float(raw.get("damping", 0.0))
            return cls(float(raw["weight"]), float(raw["floor"]), int(raw["depth"]), spec, damping)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable fusion {dict(raw)} ({exc!r})") from None


ENCODER_ALONE = Fusion()
