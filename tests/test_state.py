"""The user window: count bound, event-time horizon, event-time order, dedup, storage format."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.errors import InvalidRecord
from streams.records import Event
from streams.state import TOGETHER_KEPT, WINDOW_FORMAT_VERSION, AddOutcome, UserWindow, event_digest

HOUR = 3_600_000


def ev(n: int, ts: int, item: str | None = None) -> Event:
    return Event(event_id=f"e{n}", user_id="u", item_id=item or f"i{n}", type="view", ts=ts)


def test_count_bound_keeps_the_newest_events() -> None:
    window = UserWindow(max_events=3, horizon_ms=100 * HOUR, dedup_capacity=10)
    for n in range(5):
        assert window.add(ev(n, 1000 + n)) is AddOutcome.ADDED
    assert window.item_ids == ["i2", "i3", "i4"]


def test_horizon_is_measured_in_event_time_from_the_newest_event() -> None:
    window = UserWindow(max_events=10, horizon_ms=2 * HOUR, dedup_capacity=10)
    window.add(ev(1, 1 * HOUR))
    window.add(ev(2, 2 * HOUR))
    window.add(ev(3, 4 * HOUR))  # e1 is now 3 h older than the newest: evicted
    assert window.item_ids == ["i2", "i3"]
    assert window.add(ev(4, 1 * HOUR)) is AddOutcome.TOO_OLD
    assert window.item_ids == ["i2", "i3"]


def test_forget_erases_up_to_its_time_evicted_entries_and_ids_included_and_survives_storage() -> None:
    window = UserWindow(max_events=3, horizon_ms=100 * HOUR, dedup_capacity=10)
    for n in range(6):
        window.add(ev(n, 1000 + n))  # e0..e2 evicted, kept for replays
    assert window.forget(1003) == 4  # e0..e3
    assert window.item_ids == ["i4", "i5"]
    assert window.as_of("e2") is None  # nothing of the erased events is left to rebuild from
    restored = UserWindow.from_bytes(window.to_bytes(), 3, 100 * HOUR, 10)
    assert restored.forgotten_until == 1003 and restored.item_ids == ["i4", "i5"]
    assert restored.add(ev(2, 1002)) is AddOutcome.FORGOTTEN  # a replay of an erased event
    assert restored.add(ev(9, 1003)) is AddOutcome.FORGOTTEN  # a new one from before the command
    assert restored.add(ev(5, 1005)) is AddOutcome.DUPLICATE
    assert restored.add(ev(6, 1006)) is AddOutcome.ADDED
    assert restored.forget(1001) == 0 and restored.forgotten_until == 1003  # an older command changes nothing


def test_the_last_lists_co_occurrence_candidates_are_kept_stored_and_forgotten() -> None:
    window = UserWindow(max_events=3, horizon_ms=100 * HOUR, dedup_capacity=10)
    lists = TOGETHER_KEPT + 4
    for n in range(lists):
        window.add(ev(n, 1000 + n))
        window.remember_together(f"e{n}", ((f"next-{n}", 0.5 + n, f"i{n}"),))
    restored = UserWindow.from_bytes(window.to_bytes(), 3, 100 * HOUR, 10)
    last = lists - 1
    assert restored.together_for(f"e{last}") == ((f"next-{last}", 0.5 + last, f"i{last}"),)
    assert restored.together_for("e3") is None  # at most TOGETHER_KEPT lists' are kept
    assert all(restored.together_for(f"e{n}") is not None for n in range(4, lists))
    restored.forget(1005)
    assert restored.together_for(f"e{last}") is None  # they name the user's items: erased with them


def test_candidates_stored_in_format_6_are_still_read_and_unreadable_ones_are_said() -> None:
    """Format 6 kept each list's candidates as arrays; format 7 keeps them packed, read back for a replay."""
    entries = [[1000, "e0", "i0", "view", None]]
    seen = (0).to_bytes(8, "little")
    listed = [[event_digest("e0"), [["next", 0.25, "i0"], ["after", 0.125, "i0"]]]]
    stored_v6 = msgpack.packb({"v": 6, "entries": entries, "seen": seen, "together": listed}, use_bin_type=True)
    restored = UserWindow.from_bytes(stored_v6, 3, HOUR, 10)
    assert restored.together_for("e0") == (("next", 0.25, "i0"), ("after", 0.125, "i0"))
    again = UserWindow.from_bytes(restored.to_bytes(), 3, HOUR, 10)
    assert again.together_for("e0") == restored.together_for("e0")
    again.together[event_digest("e0")] = b"\x93\x01"
    with pytest.raises(InvalidRecord, match="corrupt co-occurrence candidates"):
        again.together_for("e0")
    stored_v7 = msgpack.unpackb(restored.to_bytes())
    stored_v7["together"] = [[event_digest("e0"), "not bytes"]]
    with pytest.raises(InvalidRecord, match="corrupt stored window"):
        UserWindow.from_bytes(msgpack.packb(stored_v7, use_bin_type=True), 3, HOUR, 10)


def test_out_of_order_events_are_placed_by_event_time() -> None:
    window = UserWindow(max_events=10, horizon_ms=100 * HOUR, dedup_capacity=10)
    for n, ts in enumerate([50, 10, 30, 20, 40]):
        window.add(ev(n, ts))
    assert [e.ts for e in window.entries] == [10, 20, 30, 40, 50]


def test_an_out_of_order_event_older_than_a_full_window_is_not_kept() -> None:
    window = UserWindow(max_events=2, horizon_ms=100 * HOUR, dedup_capacity=10)
    window.add(ev(1, 100))
    window.add(ev(2, 200))
    assert window.add(ev(3, 50)) is AddOutcome.TOO_OLD
    assert window.item_ids == ["i1", "i2"]


def test_duplicates_change_nothing_even_after_eviction() -> None:
    window = UserWindow(max_events=2, horizon_ms=100 * HOUR, dedup_capacity=10)
    window.add(ev(1, 100))
    before = window.to_bytes()
    assert window.add(ev(1, 100)) is AddOutcome.DUPLICATE
    assert window.to_bytes() == before
    window.add(ev(2, 200))
    window.add(ev(3, 300))  # e1 evicted from the window, but still remembered
    assert window.add(ev(1, 400)) is AddOutcome.DUPLICATE
    assert window.item_ids == ["i2", "i3"]


def test_storage_round_trip_and_corrupt_bytes() -> None:
    window = UserWindow(max_events=5, horizon_ms=100 * HOUR, dedup_capacity=10)
    for n in range(4):
        window.add(ev(n, 10 * n))
    restored = UserWindow.from_bytes(window.to_bytes(), 5, 100 * HOUR, 10)
    assert restored == window
    assert restored.add(ev(2, 20)) is AddOutcome.DUPLICATE
    trimmed = UserWindow.from_bytes(window.to_bytes(), 2, 100 * HOUR, 10)  # a lowered limit applies
    assert trimmed.item_ids == ["i2", "i3"]
    with pytest.raises(InvalidRecord, match="corrupt stored window"):
        UserWindow.from_bytes(b"\x92\x01", 5, HOUR, 10)
    with pytest.raises(InvalidRecord, match="unsupported window format version 9"):
        UserWindow.from_bytes(msgpack.packb({"v": 9, "entries": [], "seen": b""}), 5, HOUR, 10)


def test_windows_stored_in_format_1_are_still_read() -> None:
    """Format 1 kept the remembered event ids as strings; changelogs written by it must still restore."""
    entries = [[10 * n, f"e{n}", f"i{n}", "view", None] for n in range(3)]
    stored_v1 = msgpack.packb({"v": 1, "entries": entries, "seen": ["e0", "e1", "e2", "e-evicted"]})
    restored = UserWindow.from_bytes(stored_v1, 5, 100 * HOUR, 10)
    assert restored.item_ids == ["i0", "i1", "i2"]
    assert restored.add(Event("e-evicted", "u", "i9", "view", 40)) is AddOutcome.DUPLICATE
    assert msgpack.unpackb(restored.to_bytes())["v"] == WINDOW_FORMAT_VERSION


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 10_000)), max_size=60), st.randoms())
def test_arrival_order_and_redelivery_do_not_change_the_window(
    events: list[tuple[int, int]], shuffler: random.Random
) -> None:
    """Any arrival order of the same events, with redeliveries, ends in the same window when
    nothing falls outside the horizon: what makes replay after a crash safe."""
    unique = {n: ts for n, ts in events}
    stream = [ev(n, ts) for n, ts in unique.items()]
    in_order = UserWindow(max_events=10**6, horizon_ms=10**9, dedup_capacity=10**6)
    for event in sorted(stream, key=lambda e: (e.ts, e.event_id)):
        in_order.add(event)
    shuffled = stream + shuffler.sample(stream, k=len(stream) // 2)
    shuffler.shuffle(shuffled)
    replayed = UserWindow(max_events=10**6, horizon_ms=10**9, dedup_capacity=10**6)
    for event in shuffled:
        replayed.add(event)
    assert replayed == in_order


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20 * HOUR)), min_size=1, max_size=60),
    st.integers(1, 8),
)
def test_as_of_rebuilds_the_window_an_event_met_or_says_it_cannot(events: list[tuple[int, int]], limit: int) -> None:
    """What a redelivered event is answered from: the window just after it first arrived, exactly."""
    window, prefixes = UserWindow(max_events=limit, horizon_ms=5 * HOUR, dedup_capacity=100), {}
    for n, ts in events:
        if window.add(ev(n, ts)) is not AddOutcome.DUPLICATE:
            prefixes[f"e{n}"] = window.entries
    stored = UserWindow.from_bytes(window.to_bytes(), limit, 5 * HOUR, 100)  # evicted entries are stored too
    for event_id, entries in prefixes.items():
        then = stored.as_of(event_id)
        assert then is None or then.entries == entries, event_id
    assert stored.as_of(list(prefixes)[-1]) is not None and stored.as_of("e-never") is None


def test_as_of_covers_as_many_later_events_as_the_window_holds() -> None:
    window = UserWindow(max_events=5, horizon_ms=100 * HOUR, dedup_capacity=100)
    prefixes = []
    for n in range(20):
        window.add(ev(n, 1000 + n))
        prefixes.append(window.entries)
    assert all(window.as_of(f"e{n}").entries == prefixes[n] for n in range(14, 20))  # type: ignore[union-attr]
    assert window.as_of("e2") is None  # its window's oldest entries were evicted past those kept


def test_kept_co_occurrence_candidates_wait_for_their_triggers_commit() -> None:
    window = UserWindow(max_events=50, horizon_ms=100 * HOUR, dedup_capacity=100)
    for n in range(20):  # more lists than a commit interval used to keep
        window.remember_together(f"e{n}", ((f"i{n}", 1.0, "a"),), offset=100 + n)
    window.remember_together("unknown-offset", (("x", 0.5, "a"),))
    restored = UserWindow.from_bytes(window.to_bytes(), 50, 100 * HOUR, 100)
    assert all(restored.together_for(f"e{n}") == ((f"i{n}", 1.0, "a"),) for n in range(20))
    restored.release_together(None)  # the commit is not known: nothing goes
    assert restored.together_for("e0") is not None
    restored.release_together(115)  # offsets up to 114 will never be delivered again
    assert [restored.together_for(f"e{n}") is not None for n in (14, 15, 19)] == [False, True, True]
    assert restored.together_for("unknown-offset") is not None  # kept until the bound evicts it
