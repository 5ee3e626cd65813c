"""Windows → user vectors → candidates → the list a user sees. Pure batch logic.

One batched encoder call, one batched upsert and one batched search per
micro-batch (and, where co-occurrence is fused, one more by id for the candidates
it brings into the lists: ``streams.fused_ranking``). Items already in the window
and unavailable or deleted items are never recommended; each item carries the
window event it is most similar to as its reason, named by the item's title where
the catalogue gives one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from encoder.features import WindowArrays, assemble_inputs
from streams.cooccurrence import liked
from streams.fused_ranking import fused_rankings
from streams.fusion import ENCODER_ALONE, Fusion
from streams.item_titles import ItemTitles
from streams.item_vectors import ItemVectorCache, ItemVectors
from streams.metrics import WorkerMetrics
from streams.ports import (
    CooccurrenceScores,
    InterestEncoderRuntime,
    ItemFilter,
    SearchHit,
    SearchQuery,
    VectorPoint,
    VectorStore,
)
from streams.pseudonym import Pseudonyms
from streams.records import REJECTION_TYPES, Event, Recommendation, RecommendedItem
from streams.rerank import Feedback, RerankPolicy, merge_interests, rerank
from streams.state import Together, UserWindow, WindowEntry

REASON_VERBS = {
    "view": "viewed",
    "click": "clicked",
    "add_to_cart": "added to your cart",
    "purchase": "bought",
    "rating": "rated",
    "dislike": "disliked",
    "skip": "skipped",
    "return": "returned",
}
VETTED_BEYOND = 8  # co-occurrence candidates past a list's end the store is asked about, in case it turns some away


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class RefreshRequest:
    """One user's refresh in a micro-batch: the window after the batch's events, and what triggered it."""

    user_id: str
    window: UserWindow
    trigger: Event  # the user's last event in this micro-batch that was new to their window (if any was)
    event_ids: tuple[str, ...]  # every event of the user this refresh accounts for
    # A redelivery answered from the window the events first met: the users collection already holds a
    # newer vector for this user, which the answer must not overwrite.
    replayed: bool = False
    together: Together | None = None  # a replay's co-occurrence candidates, as its list was first ranked with
    trigger_offset: int | None = None  # the trigger's offset in its partition (its candidates are kept until then)


class Recommender:
    """Windows → user vectors → upsert → search → re-rank → explained lists, a batch at a time."""

    def __init__(
        self,
        encoder: InterestEncoderRuntime,
        store: VectorStore,
        items: ItemVectorCache,
        *,
        users_collection: str,
        top_k: int,
        clock: Callable[[], int] = now_ms,
        metrics: WorkerMetrics | None = None,
        policy: RerankPolicy | None = None,
        rules: ItemFilter | None = None,
        pseudonyms: Pseudonyms | None = None,
        cooccurrence: CooccurrenceScores | None = None,
    ) -> None:
        self.pseudonyms = pseudonyms or Pseudonyms(None)  # user vectors are stored under the state key
        self.cooccurrence = cooccurrence  # fused into the lists where the model's bundle says how
        self.metrics = metrics or WorkerMetrics()
        self.policy = policy or RerankPolicy()
        self.rules = rules  # business rules every list obeys (a request's own filter narrows them)
        self.encoder = encoder
        self.store = store
        self.items = items
        self.items_collection = items.collection
        self.users_collection = users_collection
        self.top_k = top_k
        self.clock = clock
        self.titles = ItemTitles(
            store, lambda: self.items_collection, capacity=items.capacity, ttl_s=items.ttl_s, clock=items.clock
        )

    def use(self, encoder: InterestEncoderRuntime, items: ItemVectorCache) -> None:
        """Serve another model from now on; called on the thread that runs the refreshes, between batches."""
        self.encoder, self.items, self.items_collection = encoder, items, items.collection

    def item_vectors(self, item_ids: Sequence[str]) -> ItemVectors:
        return self.items.get(item_ids)

    def forget(self, user_ids: Sequence[str]) -> None:
        """Delete the users' vectors from the store (a later refresh writes a fresh one)."""
        if user_ids:
            with self.metrics.stage("upsert"):
                self.store.delete(self.users_collection, [self.pseudonyms.of(u) for u in user_ids])

    def refresh_batch(
        self, requests: Sequence[RefreshRequest], vectors: ItemVectors, policy: RerankPolicy | None = None
    ) -> list[Recommendation]:
        """Recommendations for every request whose window holds at least one known item (re-ranked by
        ``policy``, the worker's own by default)."""
        usable = _usable(requests, vectors)
        if not usable:
            return []
        windows, user_vectors = self._encode(usable, vectors)
        emitted = self.clock()
        # The users collection holds one vector per user: of several interests, their mean.
        stored = user_vectors if user_vectors.ndim == 2 else user_vectors.mean(axis=1)
        points = []
        for (request, _), vector in zip(usable, stored, strict=True):
            if not request.replayed:
                key = self.pseudonyms.of(request.user_id)
                points.append(VectorPoint(key, vector, {"user_id": key, "model": self.encoder.version, "ts": emitted}))
        with self.metrics.stage("upsert"):
            self.store.upsert(self.users_collection, points)
        fusion = self._fusion()
        with self.metrics.stage("cooccurrence"):
            together = [self._together(request, fusion) for request, _ in usable]
        return self._search_and_rank(usable, windows, user_vectors, self.top_k, None, policy or self.policy, together)

    def rules_for(self, request: ItemFilter | None) -> ItemFilter | None:
        """The standing business rules, narrowed by a request's own filter."""
        return self.rules.narrowed_by(request) if self.rules else request

    def current(
        self,
        user_id: str,
        window: UserWindow,
        k: int,
        item_filter: ItemFilter | None = None,
        policy: RerankPolicy | None = None,
    ) -> Recommendation | None:
        """What the user would be recommended now, from their window as it stands (nothing is written).

        None when no item of the window is still in the catalogue.
        """
        now = self.current_with_interests(user_id, window, k, item_filter, policy)
        return now[0] if now is not None else None

    def current_with_interests(
        self,
        user_id: str,
        window: UserWindow,
        k: int,
        item_filter: ItemFilter | None = None,
        policy: RerankPolicy | None = None,
    ) -> tuple[Recommendation, np.ndarray] | None:
        """``current``, and the user's interest vectors it was searched with ([interests, dim]; one row for
        a single-interest encoder), from one encoder call."""
        if not window.entries:
            return None
        newest = window.entries[-1]
        trigger = Event(newest.event_id, user_id, newest.item_id, newest.type, newest.ts)
        vectors = self.item_vectors(list(set(window.item_ids)))
        usable = _usable([RefreshRequest(user_id, window, trigger, ())], vectors)
        if not usable:
            return None
        windows, user_vectors = self._encode(usable, vectors)
        with self.metrics.stage("cooccurrence"):
            together = [_by_item(self._cooccurring(window, self._fusion()))]
        rec = self._search_and_rank(usable, windows, user_vectors, k, item_filter, policy or self.policy, together)[0]
        return rec, (user_vectors[0] if user_vectors.ndim == 3 else user_vectors)

    def _encode(
        self, usable: Sequence[tuple[RefreshRequest, list[WindowEntry]]], vectors: ItemVectors
    ) -> tuple[list[WindowArrays], np.ndarray]:
        with self.metrics.stage("encode"):
            vocabulary = self.encoder.vocabulary
            windows = [
                WindowArrays(
                    item_vectors=vectors.stack([e.item_id for e in entries]),
                    type_ids=vocabulary.ids([e.type for e in entries]),
                    ts_ms=np.array([e.ts for e in entries], dtype=np.int64),
                )
                for _, entries in usable
            ]
            return windows, self.encoder.encode_batch(assemble_inputs(windows, self.encoder.dim, self.encoder.max_len))

    def _search_and_rank(
        self,
        usable: Sequence[tuple[RefreshRequest, list[WindowEntry]]],
        windows: Sequence[WindowArrays],
        user_vectors: np.ndarray,
        k: int,
        item_filter: ItemFilter | None,
        policy: RerankPolicy,
        together: Sequence[Mapping[str, tuple[float, str]]],
    ) -> list[Recommendation]:
        """``together``: each user's co-occurrence candidates (item → score, the window item it follows)."""
        rules = self.rules_for(item_filter)
        feedback = [_feedback(entries, window) for (_, entries), window in zip(usable, windows, strict=True)]
        interests = user_vectors if user_vectors.ndim == 3 else user_vectors[:, None]  # [users, interests, dim]
        per_user = interests.shape[1]
        limits = [policy.fetch_limit(k, f) for f in feedback]
        fusion = self._fusion()
        with self.metrics.stage("search"):
            steered = [np.stack([policy.query(v, f) for v in vs]) for vs, f in zip(interests, feedback, strict=True)]
            queries = [
                SearchQuery(vector=v, limit=limit, exclude_ids=r.window.item_ids, item_filter=rules)
                for (r, _), vs, limit in zip(usable, steered, limits, strict=True)
                for v in vs
            ]
            found = iter(self.store.search_batch(self.items_collection, queries))
            searched = [[next(found) for _ in range(per_user)] for _ in usable]
            nearest = [merge_interests(lists, sum(map(len, lists))) for lists in searched]
            hits = self._fused(nearest, steered, together, fusion, limits, rules)
        with self.metrics.stage("rerank"):
            return self._recommendations(usable, windows, hits, feedback, k, policy, together)

    def _fused(
        self,
        nearest: Sequence[Sequence[SearchHit]],
        steered: Sequence[np.ndarray],
        together: Sequence[Mapping[str, tuple[float, str]]],
        fusion: Fusion,
        limits: Sequence[int],
        rules: ItemFilter | None,
    ) -> list[list[SearchHit]]:
        """Each user's ``limit`` best of the encoder's hits and co-occurrence's candidates, at fused scores
        (``streams.fusion``). A candidate's encoder score comes from its cached vector (its best interest,
        ``steered`` [interests, dim]), and the store is asked only about candidates that could make the list
        and that its search did not return: whether they are available and pass the rules."""
        if not any(together):
            return [list(hits[:limit]) for hits, limit in zip(nearest, limits, strict=True)]
        vectors = self.item_vectors(list({item_id for candidates in together for item_id in candidates}))
        rankings = fused_rankings(nearest, together, np.stack(steered), vectors, fusion)
        pending = list(range(len(rankings)))
        while pending:  # one round, unless the store turns away more than VETTED_BEYOND of a list's candidates
            asked = [(n, ids) for n in pending if (ids := rankings[n].unvetted(limits[n] + VETTED_BEYOND))]
            if not asked:
                break
            answers = self.store.search_batch(
                self.items_collection,
                [SearchQuery(steered[n][0], limit=len(ids), item_filter=rules, only_ids=ids) for n, ids in asked],
            )
            for (n, ids), answer in zip(asked, answers, strict=True):
                rankings[n].vetted(ids, {hit.id: hit.payload for hit in answer})
            pending = [n for n, _ in asked if rankings[n].unvetted(limits[n])]
        return [ranking.head(limit) for ranking, limit in zip(rankings, limits, strict=True)]

    def _fusion(self) -> Fusion:
        return self.encoder.fusion if self.cooccurrence is not None else ENCODER_ALONE

    def _cooccurring(self, window: UserWindow, fusion: Fusion) -> Together:
        """Co-occurrence's candidates for a window now, best first."""
        if self.cooccurrence is None or not fusion.active:
            return ()
        entries = window.entries
        leading = liked([e.item_id for e in entries], [e.type for e in entries])
        return tuple(self.cooccurrence.scores(leading, fusion.depth, window.item_ids, fusion.damping))

    def _together(self, request: RefreshRequest, fusion: Fusion) -> dict[str, tuple[float, str]]:
        """A refresh's co-occurrence candidates: a replay's as first ranked, else the counts' now (kept in the
        window for a replay of this trigger)."""
        if not fusion.active:
            return {}
        if request.together is not None:
            return _by_item(request.together)
        candidates = self._cooccurring(request.window, fusion)
        request.window.remember_together(request.trigger.event_id, candidates, request.trigger_offset)
        return _by_item(candidates)

    def _recommendations(
        self,
        usable: Sequence[tuple[RefreshRequest, list[WindowEntry]]],
        windows: Sequence[WindowArrays],
        hits: Sequence[Sequence[SearchHit]],
        feedback: Sequence[Feedback],
        k: int,
        policy: RerankPolicy,
        together: Sequence[Mapping[str, tuple[float, str]]],
    ) -> list[Recommendation]:
        candidate_vectors = self.item_vectors(list({hit.id for candidates in hits for hit in candidates}))
        # Catalogue age at the time of the user's event, not of processing: a replay ranks as the first pass did.
        shown_lists = [
            rerank(candidates, candidate_vectors, k, policy, request.trigger.ts, signals)
            for (request, _), candidates, signals in zip(usable, hits, feedback, strict=True)
        ]
        explanations = explained_lists(
            [
                ([candidate_vectors.get(hit.id) for hit in shown], window.item_vectors, entries)
                for shown, window, (_, entries) in zip(shown_lists, windows, usable, strict=True)
            ]
        )
        lists = [
            (shown, _named_by_cooccurrence(shown, named, with_items, entries))
            for shown, named, with_items, (_, entries) in zip(shown_lists, explanations, together, usable, strict=True)
        ]
        titles = self.titles.of(e.item_id for _, explained in lists for named in explained for e in named)
        reasons: dict[tuple[WindowEntry, ...], tuple[str, tuple[str, ...]]] = {}  # a window's few, each said once
        recommendations = []
        for (request, _), (shown, explained) in zip(usable, lists, strict=True):
            items = [
                RecommendedItem(hit.id, round(hit.score, 6), *_reason(reasons, tuple(by), titles))
                for hit, by in zip(shown, explained, strict=True)
            ]
            recommendations.append(
                Recommendation(
                    user_id=request.user_id,
                    items=tuple(items),
                    model=self.encoder.version,
                    trigger_event_id=request.trigger.event_id,
                    event_ts=request.trigger.ts,
                    emitted_ts=self.clock(),
                    event_ids=request.event_ids,
                )
            )
        return recommendations


def _by_item(candidates: Together) -> dict[str, tuple[float, str]]:
    return {item_id: (score, anchor) for item_id, score, anchor in candidates}


def _named_by_cooccurrence(
    shown: Sequence[SearchHit],
    named: list[list[WindowEntry]],
    together: Mapping[str, tuple[float, str]],
    entries: Sequence[WindowEntry],
) -> list[list[WindowEntry]]:
    """An item that co-occurrence raised is explained by the window item it goes with (its newest event)."""
    if not together:
        return named
    newest = {e.item_id: e for e in entries}
    return [
        [newest[together[hit.id][1]]] if hit.id in together and together[hit.id][1] in newest else by
        for hit, by in zip(shown, named, strict=True)
    ]


def _feedback(entries: Sequence[WindowEntry], window: WindowArrays) -> Feedback:
    """The vectors of what the user rejected and bought, from their window."""
    types = [e.type for e in entries]
    return Feedback(
        rejected=window.item_vectors[[i for i, t in enumerate(types) if t in REJECTION_TYPES]],
        bought=window.item_vectors[[i for i, t in enumerate(types) if t == "purchase"]],
    )


def _usable(
    requests: Sequence[RefreshRequest], vectors: Mapping[str, np.ndarray]
) -> list[tuple[RefreshRequest, list[WindowEntry]]]:
    """Each request with the window entries whose items are still in the catalogue (those with none drop out)."""
    usable = []
    known = vectors.keys()
    for request in requests:
        # An item deleted from the catalogue since it entered the window no longer shapes interest.
        entries = [e for e in request.window.entries if e.item_id in known]
        if entries:
            usable.append((request, entries))
    return usable


SECOND_REASON_SHARE = 0.8  # a second window event is named when it is at least this similar as the first


ListToExplain = tuple[Sequence[np.ndarray | None], np.ndarray, Sequence[WindowEntry]]  # candidates, window, entries


def explained_lists(lists: Sequence[ListToExplain]) -> list[list[list[WindowEntry]]]:
    """For each candidate of each list, the window events whose items are most similar to it (one, or two
    close ones); a candidate without a vector gets the newest event. A rejection (a dislike, skip or return)
    is named only when the window holds nothing else.

    One product for all lists of a shape (a micro-batch's are nearly all one shape): per-list products took
    as long as the search."""
    welcome = [
        [i for i, e in enumerate(entries) if e.type not in REJECTION_TYPES] or list(range(len(entries)))
        for _, _, entries in lists
    ]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for n, ((candidates, _, _), kept) in enumerate(zip(lists, welcome, strict=True)):
        by_shape.setdefault((len(candidates), len(kept)), []).append(n)
    explained: list[list[list[WindowEntry]]] = [[] for _ in lists]
    for (rows, _), members in by_shape.items():
        if rows == 0:
            continue
        dim = lists[members[0]][1].shape[1]
        dtype = np.result_type(*(lists[n][1] for n in members), np.float32)
        # A candidate without a vector keeps a zero row: it is explained by the newest event instead.
        wanted = np.zeros((len(members), rows, dim), dtype=dtype)
        for slot, n in enumerate(members):
            for row, vector in enumerate(lists[n][0]):
                if vector is not None:
                    wanted[slot, row] = vector
        window = np.stack([lists[n][1][welcome[n]] for n in members])
        similarity = np.einsum("bkd,bwd->bkw", wanted, window)
        items = np.array([_item_codes(lists[n][2], welcome[n]) for n in members]).reshape(len(members), -1)
        best, second, close = _two_most_similar(similarity, items)
        for n, firsts, seconds, closes in zip(members, best.tolist(), second.tolist(), close.tolist(), strict=True):
            candidates, _, entries = lists[n]
            named_entries = [entries[i] for i in welcome[n]]
            explained[n] = [
                [named_entries[-1]]
                if candidate is None
                else [named_entries[first], named_entries[other]]
                if near
                else [named_entries[first]]
                for first, other, near, candidate in zip(firsts, seconds, closes, candidates, strict=True)
            ]
    return explained


def _item_codes(entries: Sequence[WindowEntry], positions: Sequence[int]) -> list[int]:
    """A small int per distinct item among the entries at ``positions``."""
    codes: dict[str, int] = {}
    return [codes.setdefault(entries[i].item_id, len(codes)) for i in positions]


def _two_most_similar(similarity: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``similarity`` [lists, candidates, window] and the window entries' item codes [lists, window]: each
    candidate's most similar entry, the most similar entry of another item (the same item seen twice is one
    reason), and whether that one is close enough to be named too. Ties go to the older entry."""
    best = similarity.argmax(axis=2)
    best_item = np.take_along_axis(items, best, axis=1)
    others = np.where(items[:, None, :] == best_item[:, :, None], -np.inf, similarity)
    second = others.argmax(axis=2)
    best_score = np.take_along_axis(similarity, best[..., None], axis=2)[..., 0].astype(np.float64)
    second_score = np.take_along_axis(others, second[..., None], axis=2)[..., 0].astype(np.float64)
    close = (best_score > 0) & (second_score >= SECOND_REASON_SHARE * best_score)
    return best, second, close


def _reason(
    said: dict[tuple[WindowEntry, ...], tuple[str, tuple[str, ...]]],
    named: tuple[WindowEntry, ...],
    titles: Mapping[str, str],
) -> tuple[str, tuple[str, ...]]:
    """A reason's text and the items it names, from ``said`` when it was said before."""
    reason = said.get(named)
    if reason is None:
        reason = said[named] = (reason_text(named, titles), tuple(e.item_id for e in named))
    return reason


def reason_text(named: Sequence[WindowEntry], titles: Mapping[str, str]) -> str:
    """ "because you rated Heat (1995) and rated Casino (1995)": each item by its title, else its id."""
    return "because you " + " and ".join(
        f"{REASON_VERBS.get(e.type, e.type)} {titles.get(e.item_id, e.item_id)}" for e in named
    )
