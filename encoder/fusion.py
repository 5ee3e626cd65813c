"""The fusion of the encoder with live co-occurrence (``streams.fusion``), offline: fitted by replaying
training sequences through the stream's own counting, chosen on validation targets, scored by the
same code as every other method."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from encoder.baselines import Scorer
from encoder.data import Example, History, occurrences
from encoder.ranking_metrics import POPULARITY_BUCKETS, RankCounts, in_bucket, per_example, summarize
from streams.cooccurrence import Cooccurrence, CooccurrenceSpec, liked
from streams.fusion import Fusion
from streams.records import REJECTION_TYPES

# Up to weights at which co-occurrence decides nearly alone and the encoder breaks its ties.
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
FLOORS = (0.001, 0.01, 0.1, 1.0)
DAMPINGS = (0.0, 0.1, 0.2, 0.3, 0.5)
CHUNK = 1024
BUCKET_MIN_USERS = 200  # a popularity bucket with fewer validation targets is too noisy to guard
GUARD_Z = 1.645  # the guard holds for a bucket when it holds at the lower end of a one-sided 95 % interval


def fit_cooccurrence(histories: Sequence[History], item_ids: Sequence[str], spec: CooccurrenceSpec) -> Cooccurrence:
    """Co-occurrence as a stream would have counted these histories, each event after the ones before it."""
    counts = Cooccurrence(spec)
    for history in histories:
        earlier: list[str] = []  # what the user liked so far (``streams.cooccurrence.pairs_with``)
        for row, kind, ts in zip(history.items.tolist(), history.types, history.ts_ms.tolist(), strict=True):
            if kind not in REJECTION_TYPES:
                counts.observe(earlier[-spec.span :], item_ids[row], int(ts))
                earlier.append(item_ids[row])
    return counts


def cooccurrence_scores(
    counts: Cooccurrence, histories: Sequence[History], item_ids: Sequence[str], fusion: Fusion
) -> np.ndarray:
    """[len(histories), n_items]: each history's ``fusion.depth`` best co-occurrence scores with its damping
    (its own items left out), zero elsewhere: the candidates the stream would take from co-occurrence."""
    row_of = {item_id: row for row, item_id in enumerate(item_ids)}
    out = np.zeros((len(histories), len(item_ids)), dtype=np.float32)
    for n, history in enumerate(histories):
        names = [item_ids[row] for row in history.items]
        for item_id, score, _ in counts.scores(liked(names, history.types), fusion.depth, names, fusion.damping):
            out[n, row_of[item_id]] = score
    return out


class FusedScorer:
    """The served list offline: the encoder's scores raised by co-occurrence, as ``streams.fusion`` defines."""

    def __init__(self, model: Scorer, counts: Cooccurrence, item_ids: Sequence[str], fusion: Fusion) -> None:
        self.model, self.counts, self.item_ids, self.fusion = model, counts, item_ids, fusion
        self.name = f"fused: {model.name} + co-occurrence ({describe(fusion)})"

    def scores(self, histories: Sequence[History]) -> np.ndarray:
        cooccurrence = cooccurrence_scores(self.counts, histories, self.item_ids, self.fusion)
        return self.fusion.fused(self.model.scores(histories), cooccurrence)


def choose_fusion(
    encoder_scores: Callable[[Sequence[History]], np.ndarray],
    training: Sequence[History],
    valid: Sequence[Example],
    item_ids: Sequence[str],
    spec: CooccurrenceSpec,
    guard: float,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[Fusion, list[dict[str, float]]]:
    """The weight, floor and damping with the best NDCG@10 on ``valid`` (co-occurrence counted on
    ``training``, which must not hold the validation targets) among those that keep ``guard`` of
    co-occurrence alone's NDCG@10 in every bucket of target popularity; and every candidate's figures.

    The guard is there because the best blend overall can still lose to co-occurrence on rare targets
    (most of a shop's), which it ranks well and the encoder poorly. A bucket keeps it when the lower
    end of a one-sided 95 % interval of its share does: a bucket of a few hundred validation targets
    can put a blend several per cent above its true share. Should no candidate keep the guard, the
    one nearest to it is chosen. A weight of 0 (the encoder alone) is a candidate too."""
    counts = fit_cooccurrence(training, item_ids, spec)
    base = Fusion(cooccurrence=spec)
    grid = [
        replace(base, weight=w, floor=f, damping=d)
        for w in WEIGHTS
        for f in (FLOORS if w else FLOORS[:1])
        for d in (DAMPINGS if w else DAMPINGS[:1])
    ]
    parts: list[list[RankCounts]] = [[] for _ in grid]
    alone: list[RankCounts] = []  # co-occurrence's own ranking (undamped), the guard's reference
    for start in range(0, len(valid), CHUNK):
        chunk = valid[start : start + CHUNK]
        histories = [e.history for e in chunk]
        encoder = encoder_scores(histories)
        cooccurrence = {d: cooccurrence_scores(counts, histories, item_ids, replace(base, damping=d)) for d in DAMPINGS}
        targets, exclude = [e.target for e in chunk], [e.history.items for e in chunk]
        alone.append(RankCounts.from_scores(cooccurrence[0.0], targets, exclude))
        for part, fusion in zip(parts, grid, strict=True):
            fused = fusion.fused(encoder, cooccurrence[fusion.damping])
            part.append(RankCounts.from_scores(fused, targets, exclude))
    buckets = popularity_buckets(valid, training, len(item_ids))
    alone_ndcg = per_example(RankCounts.concatenate(alone), 10)["ndcg@10"]
    buckets = [mask for mask in buckets if alone_ndcg[mask].mean() > 0]
    table = []
    for fusion, part in zip(grid, parts, strict=True):
        ranks = RankCounts.concatenate(part)
        ndcg = per_example(ranks, 10)["ndcg@10"]
        shares = [bucket_share(ndcg, alone_ndcg, mask) for mask in buckets]
        worst = min((share for share, _ in shares), default=1.0)
        lowest = min((lower for _, lower in shares), default=1.0)
        table.append(
            {"weight": fusion.weight, "floor": fusion.floor, "damping": fusion.damping, **summarize(ranks)}
            | {"worst_bucket_share": worst, "worst_bucket_lower": lowest}
        )
    kept = [i for i, row in enumerate(table) if row["worst_bucket_lower"] >= guard]
    best = (
        max(kept, key=lambda i: table[i]["ndcg@10"])
        if kept
        else max(range(len(grid)), key=lambda i: table[i]["worst_bucket_lower"])
    )
    chosen = table[best]
    progress(
        f"fusion with co-occurrence, chosen on {len(valid):,} validation users: {describe(grid[best])}: "
        f"NDCG@10 {chosen['ndcg@10']:.4f} (encoder alone {table[0]['ndcg@10']:.4f}); worst popularity bucket "
        f"{chosen['worst_bucket_share']:.3f} of co-occurrence alone (95 % above {chosen['worst_bucket_lower']:.3f})"
        + ("" if not guard else f" (guard {guard:g} {'kept' if kept else 'kept by no blend: the nearest taken'})")
    )
    return grid[best], table


def describe(fusion: Fusion) -> str:
    return f"weight {fusion.weight:g}, floor {fusion.floor:g}, damping {fusion.damping:g}"


def popularity_buckets(valid: Sequence[Example], training: Sequence[History], n_items: int) -> list[np.ndarray]:
    """Masks over ``valid``: its targets by popularity in ``training``, the buckets with enough users to be
    judged, targets that never occur in training left out (co-occurrence cannot rank them)."""
    popularity = occurrences(training, n_items)[np.array([e.target for e in valid], dtype=np.int64)]
    masks = [in_bucket(popularity, low, high) for low, high in POPULARITY_BUCKETS if low > 0]
    return [mask for mask in masks if mask.sum() >= BUCKET_MIN_USERS]


def bucket_share(ndcg: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """A bucket's NDCG@10 as a share of the reference's, and the lower end of its one-sided 95 % interval
    (the delta method's variance of a ratio of means over the bucket's users)."""
    ours, theirs = ndcg[mask], reference[mask]
    share = float(ours.mean() / theirs.mean())
    spread = float(np.std(ours - share * theirs) / (theirs.mean() * np.sqrt(mask.sum())))
    return share, share - GUARD_Z * spread
