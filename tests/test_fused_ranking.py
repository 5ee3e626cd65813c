"""A user's candidates at fused scores (streams.fused_ranking): co-occurrence's scored from their vectors by the
closest interest, the encoder's hits boosted, and only what the store vouched for in a list."""

from __future__ import annotations

import numpy as np
import pytest

from streams.fused_ranking import UNVETTED, fused_rankings
from streams.fusion import Fusion
from streams.item_vectors import ItemVectors
from streams.ports import SearchHit

FUSION = Fusion(weight=1.0, floor=0.1)
VECTORS = ItemVectors.of(
    {
        "near-first": np.array([1.0, 0.0], dtype=np.float32),
        "near-second": np.array([0.0, 2.0], dtype=np.float32),
        "found": np.array([0.5, 0.0], dtype=np.float32),
        "plain": np.array([0.2, 0.2], dtype=np.float32),
    }
)
INTERESTS = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)  # one user of two interests


def test_candidates_are_scored_by_their_closest_interest_and_the_boost() -> None:
    on_sale = {"available": True}
    hits = [SearchHit("found", 0.5, on_sale), SearchHit("plain", 0.2, on_sale)]
    together = {"near-second": (0.1, "a"), "near-first": (0.3, "a"), "found": (0.1, "a"), "deleted": (9.0, "a")}
    (ranking,) = fused_rankings([hits], [together], INTERESTS, VECTORS, FUSION)
    head = ranking.head(10)
    assert [(h.id, round(h.score, 5)) for h in head] == [
        ("near-second", round(float(FUSION.fused(2.0, 0.1)), 5)),  # by the second interest
        ("near-first", round(float(FUSION.fused(1.0, 0.3)), 5)),
        ("found", round(float(FUSION.fused(0.5, 0.1)), 5)),
        ("plain", 0.2),
    ]  # the deleted item (no vector) is left out
    assert [h.payload is UNVETTED for h in head] == [True, True, False, False]
    assert ranking.unvetted(2) == ["near-second", "near-first"] and ranking.unvetted(1) == ["near-second"]


def test_what_the_store_turns_away_leaves_and_the_next_moves_up() -> None:
    hits = [SearchHit("plain", 0.2, {"available": True})]
    together = {"near-second": (0.1, "a"), "near-first": (0.3, "a"), "found": (0.1, "a")}
    (ranking,) = fused_rankings([hits], [together], INTERESTS, VECTORS, FUSION)
    ranking.vetted(["near-second", "near-first"], {"near-first": {"available": True, "ts": 5}})
    head = ranking.head(3)
    assert [h.id for h in head] == ["near-first", "found", "plain"]
    assert head[0].payload == {"available": True, "ts": 5} and head[1].payload is UNVETTED
    assert ranking.unvetted(3) == ["found"]


@pytest.mark.parametrize("together", [{}, {"deleted": (1.0, "a")}])
def test_without_scorable_candidates_the_encoders_hits_stand(together: dict[str, tuple[float, str]]) -> None:
    hits = [SearchHit("found", 0.5, {}), SearchHit("plain", 0.2, {})]
    (ranking,) = fused_rankings([hits], [together], INTERESTS, VECTORS, FUSION)
    assert ranking.head(5) == hits and ranking.unvetted(5) == []
