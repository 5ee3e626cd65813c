"""The event micro-batch step with the real ONNX encoders and embedded Qdrant (no broker needed):
restored windows are reused only while the table still holds the bytes they came from."""

from __future__ import annotations

from pathlib import Path

from streams.pipeline import EventBatchProcessor, IncomingMessage, WindowLimits
from streams.records import ControlCommand, Event, encode_control, encode_event
from streams.state import UserWindow
from tests.harness import processors

HORIZON_MS = 10**12


def _processor(tmp_path: Path, models_dir: Path) -> EventBatchProcessor:
    return processors(tmp_path, models_dir, WindowLimits(10, HORIZON_MS, 100)).events


def _messages(*events: Event) -> list[IncomingMessage]:
    return [IncomingMessage(e.user_id.encode(), encode_event(e), "events", 0, n) for n, e in enumerate(events)]


def _event(n: int, item: int) -> Event:
    return Event(f"e{n}", "u1", f"item-{item:06d}", "view", 1_700_000_000_000 + n)


def test_a_window_is_reused_only_while_the_table_holds_its_bytes(tmp_path: Path, models_dir: Path) -> None:
    processor = _processor(tmp_path, models_dir)
    first = processor.process(_messages(_event(1, 1), _event(2, 2)), {})
    stored = first.windows["u1"]
    assert [r.trigger_event_id for r in first.recommendations] == ["e2"]

    second = processor.process(_messages(_event(3, 3)), {"u1": stored})  # the restored object is reused
    window = UserWindow.from_bytes(second.windows["u1"], 10, HORIZON_MS, 100)
    assert window.item_ids == ["item-000001", "item-000002", "item-000003"]

    # Another worker owned the user meanwhile (a rebalance) and wrote its own window: that one counts.
    elsewhere = UserWindow(10, HORIZON_MS, 100)
    elsewhere.add(_event(7, 7))
    third = processor.process(_messages(_event(8, 8)), {"u1": elsewhere.to_bytes()})
    window = UserWindow.from_bytes(third.windows["u1"], 10, HORIZON_MS, 100)
    assert window.item_ids == ["item-000007", "item-000008"]
    assert processor.process(_messages(_event(8, 8)), {"u1": third.windows["u1"]}).counts["duplicates"] == 1


def _forget(user: str, offset: int, ts: int) -> IncomingMessage:
    command = ControlCommand("forget_user", user, ts)
    return IncomingMessage(user.encode(), encode_control(command), "rec.control", 0, offset)


def test_forget_user_erases_the_users_events_up_to_its_time(tmp_path: Path, models_dir: Path) -> None:
    processor = _processor(tmp_path, models_dir)
    store, users = processor.recommender.store, processor.recommender.users_collection
    first = processor.process(_messages(_event(1, 1), _event(2, 2)), {})
    assert store.fetch_vectors(users, ["u1"])
    # In one batch: an event, the command (up to event 3's time), an event from before it and one after.
    until = _event(3, 3).ts
    second = processor.process(
        [*_messages(_event(3, 3)), _forget("u1", 10, until), *_messages(_event(0, 9), _event(4, 4))],
        {"u1": first.windows["u1"]},
    )
    window = UserWindow.from_bytes(second.windows["u1"], 10, HORIZON_MS, 100)
    assert window.item_ids == ["item-000004"] and window.forgotten_until == until
    assert second.counts["erased"] == 2 and [r.trigger_event_id for r in second.recommendations] == ["e4"]
    # A command alone: the user's vector is gone, and what is stored is only the time erased up to.
    third = processor.process([_forget("u2", 11, until)], {})
    marker = UserWindow.from_bytes(third.windows["u2"], 10, HORIZON_MS, 100)
    assert len(marker) == 0 and marker.forgotten_until == until and not third.recommendations
    processor.process([_forget("u1", 11, until)], {"u1": second.windows["u1"]})
    assert not store.fetch_vectors(users, ["u1"])
    # A malformed command is dead-lettered with its reason; the batch goes on.
    bad = IncomingMessage(b"u2", b"\x81\xa1v\x01", "rec.control", 0, 12)
    fourth = processor.process([bad, *_messages(_event(5, 5))], {})
    assert [d.error for d in fourth.dead_letters] == ["field 'command': unknown command 'None' (known: forget_user)"]
    assert fourth.recommendations


def test_a_replay_after_a_crash_neither_undoes_nor_overreaches_a_forget(tmp_path: Path, models_dir: Path) -> None:
    """The control and events topics are not ordered against each other: a replay can bring the command
    back after the user's later events, or an erased event back after the command."""
    processor = _processor(tmp_path, models_dir)
    until = _event(2, 2).ts
    first = processor.process([*_messages(_event(1, 1), _event(2, 2)), _forget("u1", 10, until)], {})
    later = processor.process(_messages(_event(3, 3)), {"u1": first.windows["u1"]})
    stored = later.windows["u1"]

    # The command again: the event since is kept.
    again = processor.process([_forget("u1", 10, until)], {"u1": stored})
    assert UserWindow.from_bytes(again.windows["u1"], 10, HORIZON_MS, 100).item_ids == ["item-000003"]
    # An erased event again: refused, counted as erased, nothing stored or sent.
    replayed = processor.process(_messages(_event(1, 1)), {"u1": stored})
    assert replayed.counts["erased"] == 1 and not replayed.windows and not replayed.recommendations
    # The stored window stays as it was: the forgotten event's id is not even remembered.
    assert UserWindow.from_bytes(stored, 10, HORIZON_MS, 100).item_ids == ["item-000003"]


def test_a_redelivered_batch_gets_the_list_it_got_first_and_leaves_the_user_vector(
    tmp_path: Path, models_dir: Path
) -> None:
    """A worker killed after writing its windows replays events its stored windows already hold."""
    processor = _processor(tmp_path, models_dir)
    store, users = processor.recommender.store, processor.recommender.users_collection
    first = processor.process(_messages(_event(1, 1), _event(2, 2)), {})
    later = processor.process(_messages(*(_event(n, n) for n in range(3, 12))), {"u1": first.windows["u1"]})
    newest = store.fetch_vectors(users, ["u1"])["u1"]
    # 11 events in a window of 10: e1 was evicted, yet the window e2 met is rebuilt, its item's vector too.
    replay = processor.process(_messages(_event(2, 2)), {"u1": later.windows["u1"]})
    assert replay.counts["duplicates"] == 1 and replay.windows["u1"] == later.windows["u1"]
    (again,) = replay.recommendations
    (original,) = first.recommendations
    assert again.trigger_event_id == original.trigger_event_id == "e2"
    assert again.items == original.items  # the same items, scores and reasons
    assert [i.item_id for i in again.items] != [i.item_id for i in later.recommendations[0].items]
    assert (store.fetch_vectors(users, ["u1"])["u1"] == newest).all()  # the answer did not overwrite it
