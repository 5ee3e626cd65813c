"""Re-ranking and reasons on hand-built candidates, and how standing rules combine with a request's filter."""

from __future__ import annotations

import numpy as np

from streams.ports import ItemFilter, SearchHit
from streams.recommend import explained_lists, reason_text
from streams.rerank import Feedback, RerankPolicy, merge_interests, rerank
from streams.state import WindowEntry

NOW = 1_000_000_000_000
HOUR_MS = 3_600_000


def _hit(item_id: str, score: float, age_h: float = 0.0) -> SearchHit:
    return SearchHit(item_id, score, {"ts": NOW - int(age_h * HOUR_MS)})


def _clusters() -> tuple[list[SearchHit], dict[str, np.ndarray]]:
    """Four near-copies of one item score highest; two items of another kind score a little less."""
    rng = np.random.default_rng(0)
    a, b = np.eye(8)[0], np.eye(8)[1]
    vectors = {f"a{i}": a + 0.01 * rng.normal(size=8) for i in range(4)}
    vectors |= {f"b{i}": b + 0.01 * rng.normal(size=8) for i in range(2)}
    hits = [_hit(f"a{i}", 1.0 - 0.01 * i) for i in range(4)] + [_hit(f"b{i}", 0.9 - 0.01 * i) for i in range(2)]
    return hits, vectors


def test_without_reranking_the_list_is_the_stores_top_k() -> None:
    hits, vectors = _clusters()
    assert rerank(hits, vectors, 3, RerankPolicy(), NOW) == hits[:3]
    assert RerankPolicy().fetch_limit(10) == 10 and RerankPolicy(diversity=0.3).fetch_limit(10) == 50


def test_diversity_lets_another_kind_of_item_into_the_list() -> None:
    hits, vectors = _clusters()
    assert [h.id for h in rerank(hits, vectors, 3, RerankPolicy(diversity=0.0001), NOW)] == ["a0", "a1", "a2"]
    diverse = [h.id for h in rerank(hits, vectors, 3, RerankPolicy(diversity=0.5), NOW)]
    assert diverse[:2] == ["a0", "b0"]  # the best item first, then the best of the other kind
    assert len(set(diverse)) == 3


def test_freshness_lifts_new_items_by_their_catalogue_age() -> None:
    hits = [_hit("old", 1.0, age_h=48), _hit("new", 0.8, age_h=1), _hit("newest", 0.0, age_h=0)]
    vectors = {h.id: np.eye(3)[i] for i, h in enumerate(hits)}
    assert [h.id for h in rerank(hits, vectors, 2, RerankPolicy(freshness_half_life_s=24 * 3600), NOW)] == [
        "new",  # 0.8 rescaled to 0.8, decayed 3 % beats 1.0 decayed by two half-lives
        "old",
    ]
    assert [h.id for h in rerank(hits, vectors, 2, RerankPolicy(freshness_half_life_s=1000 * 3600), NOW)] == [
        "old",
        "new",
    ]


def test_candidates_resembling_a_dislike_sink_and_only_those_users_lists_are_fetched_deeper() -> None:
    hits, vectors = _clusters()
    disliked = Feedback(rejected=np.stack([vectors["a0"]]))
    assert RerankPolicy().fetch_limit(10) == 10 and RerankPolicy().fetch_limit(10, disliked) == 50
    assert [h.id for h in rerank(hits, vectors, 3, RerankPolicy(), NOW)] == ["a0", "a1", "a2"]
    strong = RerankPolicy(dislike_penalty=1.0)  # a near-copy of a dislike loses all its (rescaled) relevance
    sunk = [h.id for h in rerank(hits, vectors, 3, strong, NOW, disliked)]
    assert sunk[0] == "b0" and "b1" in sunk  # the other kind leads; one near-copy of the dislike is left
    assert [h.id for h in rerank(hits, vectors, 3, RerankPolicy(dislike_penalty=0), NOW, disliked)] == [
        "a0",
        "a1",
        "a2",
    ]


def test_near_duplicates_of_a_purchase_can_be_left_out() -> None:
    hits, vectors = _clusters()
    bought = Feedback(bought=np.stack([np.eye(8)[0]]))  # the item the a-cluster copies
    assert [h.id for h in rerank(hits, vectors, 3, RerankPolicy(), NOW, bought)] == ["a0", "a1", "a2"]  # off
    kept = rerank(hits, vectors, 3, RerankPolicy(bought_duplicate_similarity=0.95), NOW, bought)
    assert [h.id for h in kept] == ["b0", "b1"]  # fewer than k rather than a near-duplicate


def test_a_request_can_only_narrow_the_standing_rules() -> None:
    rules = ItemFilter(categories=("books", "music"), exclude_categories=("adult",), max_price=100)
    assert rules.narrowed_by(None) == rules
    narrowed = rules.narrowed_by(ItemFilter(categories=("music", "garden"), min_price=5, max_price=500))
    # garden is asked for but not allowed: kept out by exclusion, so only music can match.
    assert narrowed == ItemFilter(
        categories=("music", "garden"), exclude_categories=("adult", "garden"), min_price=5, max_price=100
    )
    assert ItemFilter(exclude_categories=("adult",)).narrowed_by(ItemFilter(categories=("books",))) == ItemFilter(
        categories=("books",), exclude_categories=("adult",)
    )


def test_the_search_is_steered_away_from_rejected_items_only_when_there_are_some() -> None:
    user = np.array([0.8, 0.6], dtype=np.float32)
    rejected = Feedback(rejected=np.array([[2.0, 0.0]], dtype=np.float32))
    steered = RerankPolicy(dislike_penalty=0.5).query(user, rejected)
    np.testing.assert_allclose(steered, [0.3, 0.6], rtol=1e-6)  # half the user's norm taken off along the rejection
    assert steered.dtype == np.float32
    assert RerankPolicy().query(user) is user and RerankPolicy(dislike_penalty=0).query(user, rejected) is user


def test_a_reason_names_the_window_events_most_like_the_item() -> None:
    entries = [
        WindowEntry(1, "e1", "lamp", "view"),
        WindowEntry(2, "e2", "desk", "purchase"),
        WindowEntry(3, "e3", "sofa", "click"),
        WindowEntry(4, "e4", "lamp", "click"),
    ]
    window = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # The lamp twice is one reason; the desk is nearly as close, so it is named too; the sofa is not.
    # A candidate without a vector (deleted meanwhile) gets the newest event.
    assert reasons_for([np.array([1.0, 0.05, 0.0]), np.array([0.0, 1.0, 0.0]), None], window, entries) == [
        "because you viewed lamp and bought desk",
        "because you clicked sofa",
        "because you clicked lamp",
    ]


def reasons_for(candidates: list[np.ndarray | None], window: np.ndarray, entries: list[WindowEntry]) -> list[str]:
    return [reason_text(named, {}) for named in explained_lists([(candidates, window, entries)])[0]]


def test_a_reason_names_items_by_their_titles_and_ids_where_there_is_none() -> None:
    named = [WindowEntry(1, "e1", "m1", "rating"), WindowEntry(2, "e2", "m2", "view")]
    assert reason_text(named, {"m1": "Heat (1995)"}) == "because you rated Heat (1995) and viewed m2"


def test_a_reason_never_names_a_rejection_while_the_window_holds_anything_else() -> None:
    entries = [WindowEntry(1, "e1", "lamp", "view"), WindowEntry(2, "e2", "sofa", "skip")]
    window = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert reasons_for([np.array([0.0, 1.0]), None], window, entries) == ["because you viewed lamp"] * 2
    only_returns = [WindowEntry(1, "e1", "sofa", "return")]
    assert reasons_for([np.array([0.0, 1.0])], window[1:], only_returns) == ["because you returned sofa"]
    assert reasons_for([], window, entries) == []


def test_interests_merge_by_each_candidates_closest_interest_without_repeats() -> None:
    def hits(*pairs: tuple[str, float]) -> list[SearchHit]:
        return [SearchHit(i, s, {}) for i, s in pairs]

    music = hits(("m1", 0.9), ("shared", 0.5), ("m2", 0.7), ("m3", 0.2))
    games = hits(("g1", 0.95), ("shared", 0.8), ("g2", 0.4))
    merged = merge_interests([music, games], 5)
    assert [h.id for h in merged] == ["g1", "m1", "shared", "m2", "g2"]  # "shared" once, at its better score
    assert merged[2].score == 0.8
    assert [h.id for h in merge_interests([music], 2)] == ["m1", "m2"]
    assert [h.id for h in merge_interests([music, []], 9)] == ["m1", "m2", "shared", "m3"]


def test_lists_explained_together_name_what_each_explained_alone_names() -> None:
    """A micro-batch's lists are explained in one product per shape; mixed shapes, rejections, candidates
    without vectors and empty lists come out as each list alone."""
    rng = np.random.default_rng(5)
    types = ["view", "click", "purchase", "skip", "dislike"]
    lists = []
    for n in range(40):
        length = int(rng.integers(1, 7))
        entries = [
            WindowEntry(t, f"e{n}-{t}", f"i{rng.integers(0, 5)}", types[rng.integers(0, 5)]) for t in range(length)
        ]
        window = rng.normal(size=(length, 4)).astype(np.float32)
        candidates = [None if rng.random() < 0.1 else rng.normal(size=4).astype(np.float32) for _ in range(n % 4)]
        lists.append((candidates, window, entries))
    together = explained_lists(lists)
    assert together == [explained_lists([one])[0] for one in lists]
    assert sum(1 for named in together if named) > 20 and any(len(n) == 2 for named in together for n in named)
