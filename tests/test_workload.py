"""The workload generator: seeded, readable, and its ground truth holds."""

from __future__ import annotations

import itertools

from streams.tools.workload import Workload, WorkloadConfig


def test_catalogue_is_seeded_readable_and_spans_the_categories() -> None:
    first, again = Workload(WorkloadConfig(n_items=400, seed=3)), Workload(WorkloadConfig(n_items=400, seed=3))
    assert first.catalog == again.catalog
    assert {item.category for item in first.catalog} == set(first.categories)
    assert len({item.title for item in first.catalog}) == 400
    assert all(item.category in item.text() and len(item.text().split()) >= 8 for item in first.catalog)


def test_every_event_follows_the_interest_the_generator_records() -> None:
    workload = Workload(WorkloadConfig(n_items=400, drift_prob=0.1, seed=3))
    histories = workload.histories(n_users=50, events_per_user=100)
    events = [g for history in histories for g in history]
    assert all(workload.category_of[g.event.item_id] == g.interest for g in events)
    switches = sum(a.interest != b.interest for history in histories for a, b in itertools.pairwise(history))
    assert 0.07 < switches / (50 * 99) < 0.13  # drift_prob, within sampling noise
    assert all(a.event.ts < b.event.ts for history in histories for a, b in itertools.pairwise(history))


def test_live_stream_is_stamped_by_the_clock_and_scripted_users_switch_on_cue() -> None:
    workload = Workload(WorkloadConfig(n_items=400, n_users=20, seed=3))
    ticks = itertools.count(1_000)
    stream = list(workload.stream(200, clock=lambda: next(ticks)))
    assert [g.event.ts for g in stream] == list(range(1_000, 1_200))
    assert len({g.event.user_id for g in stream}) <= 20
    assert len({g.event.event_id for g in stream}) == 200
    scripted = workload.scripted_user(9, [("kitchen", 3), ("gaming", 2)], clock=lambda: 5)
    assert [workload.category_of[g.event.item_id] for g in scripted] == ["kitchen"] * 3 + ["gaming"] * 2


def test_users_of_a_second_standing_interest_draw_that_share_of_their_events_from_it() -> None:
    plain = Workload(WorkloadConfig(seed=3)).histories(20, 30)
    assert Workload(WorkloadConfig(seed=3, second_interest_prob=0.0)).histories(20, 30) == plain  # same users
    mixed = Workload(WorkloadConfig(seed=3, drift_prob=0.0, second_interest_prob=0.3)).histories(200, 30)
    kinds = [{g.interest for g in history} for history in mixed]
    assert all(len(k) <= 2 for k in kinds) and sum(len(k) == 2 for k in kinds) > 180
    share = [min(sum(g.interest == c for g in h) for c in {g.interest for g in h}) / 30 for h in mixed]
    assert 0.25 < sum(share) / len(share) < 0.35
