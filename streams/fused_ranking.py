"""A user's candidates at fused scores (``streams.fusion``): the encoder's hits, which the store's search
returned, and co-occurrence's candidates, scored from their cached vectors.

Co-occurrence's candidates used to be scored by the store, in a search among their ids: ~50 hits built a
user, of which a list shows 10-18. Now the store is asked only about the candidates that reach a list
(``FusedRanking.unvetted``), so that availability and the business rules hold for them as for any hit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streams.fusion import Fusion
from streams.item_vectors import ItemVectors
from streams.ports import SearchHit

UNVETTED: dict[str, Any] = {}  # the payload of a candidate the store was not asked about (compared by identity)


class FusedRanking:
    """One user's list in the making: the encoder's hits (which the store returned, so vetted: available, within
    the rules) and co-occurrence's other candidates, each at its fused score. A candidate's hit is built only
    when a list reaches it, with the ``UNVETTED`` payload until the store answers for it (``vetted``)."""

    def __init__(self, hits: list[SearchHit], others: list[tuple[str, float]]) -> None:
        self._hits = hits  # best first
        self._others = others  # (item, fused score), best first
        self._payloads: dict[str, dict[str, Any]] = {}  # of the others the store returned
        self._turned_away: set[str] = set()

    def head(self, size: int) -> list[SearchHit]:
        """The ``size`` best hits, best first (a tie goes to the encoder's hit)."""
        hits, others = self._hits, self._others
        head: list[SearchHit] = []
        h = o = 0
        while len(head) < size and (h < len(hits) or o < len(others)):
            if o < len(others) and others[o][0] in self._turned_away:
                o += 1
            elif o == len(others) or (h < len(hits) and hits[h].score >= others[o][1]):
                head.append(hits[h])
                h += 1
            else:
                item_id, score = others[o]
                head.append(SearchHit(item_id, score, self._payloads.get(item_id, UNVETTED)))
                o += 1
        return head

    def unvetted(self, size: int) -> list[str]:
        """The candidates among the ``size`` best that the store has not answered for."""
        return [hit.id for hit in self.head(size) if hit.payload is UNVETTED]

    def vetted(self, asked: Sequence[str], payloads: Mapping[str, dict[str, Any]]) -> None:
        """The store's answer about ``asked``: the payloads of those it returned; the rest leave the ranking."""
        self._payloads.update(payloads)
        self._turned_away.update(item_id for item_id in asked if item_id not in payloads)


def fused_rankings(
    hits: Sequence[Sequence[SearchHit]],
    together: Sequence[Mapping[str, tuple[float, str]]],
    queries: np.ndarray,
    vectors: ItemVectors,
    fusion: Fusion,
) -> list[FusedRanking]:
    """Each user's encoder ``hits`` and co-occurrence candidates (``together``: item → its co-occurrence score,
    first) at fused scores. A candidate's encoder score is its vector's dot product with the closest of the
    user's ``queries`` ([users, interests, dim]), all users' in one product; one without a vector (gone from
    the catalogue) is left out. A hit co-occurrence also found keeps the closer of its two scores."""
    known = [[item_id for item_id in candidates if item_id in vectors] for candidates in together]
    ids = [item_id for user_ids in known for item_id in user_ids]
    owners = np.repeat(np.arange(len(known)), [len(user_ids) for user_ids in known])
    counts = np.array([c[item_id][0] for c, user_ids in zip(together, known, strict=True) for item_id in user_ids])
    encoder = np.einsum("nd,nid->ni", vectors.stack(ids), queries[owners]).max(axis=1) if ids else np.zeros(0)
    fused = fusion.fused(encoder, counts) if ids else np.zeros(0)
    boosts, scores = (fused - encoder).tolist(), fused.tolist()
    rankings, start = [], 0
    for user_hits, user_ids in zip(hits, known, strict=True):
        end = start + len(user_ids)
        returned = {hit.id: hit for hit in user_hits}
        also = {  # the encoder's hits that co-occurrence names too: boosted, at the closer interest's score
            ids[i]: max(scores[i], returned[ids[i]].score + boosts[i]) for i in range(start, end) if ids[i] in returned
        }
        ranked = sorted(
            (SearchHit(h.id, also[h.id], h.payload) if h.id in also else h for h in user_hits),
            key=lambda hit: -hit.score,
        )
        order = (start + np.argsort(-fused[start:end], kind="stable")).tolist()
        rankings.append(FusedRanking(ranked, [(ids[i], scores[i]) for i in order if ids[i] not in returned]))
        start = end
    return rankings
