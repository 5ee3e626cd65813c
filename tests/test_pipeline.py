"""The vertical slice, proven through the real Kafka broker and a real worker process."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from infra.kafka_local import LocalKafka
from streams.cli import main
from streams.recommend import now_ms
from streams.records import DeadLetter, Event, Recommendation, encode_event, encode_item
from streams.state import UserWindow
from tests.harness import Pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(kafka: LocalKafka, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    running = Pipeline(kafka.config.bootstrap, models_dir, tmp_path_factory.mktemp("pipeline")).start()
    try:
        running.publish_catalog()
        yield running
    finally:
        running.stop()


def _windows_at(events: list[Event], settings_window: int, horizon_ms: int) -> dict[str, UserWindow]:
    """Each event id → a copy of its user's window right after that event (test-side replay)."""
    windows: dict[str, UserWindow] = {}
    snapshots = {}
    for event in events:
        window = windows.setdefault(event.user_id, UserWindow(settings_window, horizon_ms, 500))
        window.add(event)
        snapshots[event.event_id] = UserWindow.from_bytes(window.to_bytes(), settings_window, horizon_ms, 500)
    return snapshots


def _last_event_of(rec: Recommendation, order: dict[str, int]) -> str:
    return max(rec.event_ids, key=order.__getitem__)


def test_every_event_is_reflected_or_dead_lettered(pipeline: Pipeline) -> None:
    events = [g.event for g in pipeline.workload.stream(400, clock=now_ms, first_user=0)]
    valid = encode_event(events[0])
    unpacked = msgpack.unpackb(valid)
    user_key = events[0].user_id.encode()

    def variant(**changes: object) -> bytes:
        return msgpack.packb({**unpacked, **changes, "event_id": f"bad-{len(changes)}-{next(counter)}"})

    counter = iter(range(10_000))
    bad: list[tuple[bytes | None, bytes | None, str]] = [
        (user_key, valid[:-7], "not a msgpack payload"),
        (user_key, b"\xc1\x00garbage", "not a msgpack payload"),
        (user_key, variant(ts="yesterday"), "field 'ts': expected int epoch milliseconds, got str"),
        (user_key, variant(type="teleport"), "field 'type': unknown event type 'teleport'"),
        (user_key, variant(item_id=None), "field 'item_id': missing"),
        (user_key, variant(v=2), "field 'v': unsupported schema version 2"),
        (user_key, variant(item_id="x" * 5000), "field 'item_id': 5000 characters exceeds the limit"),
        (user_key, variant(item_id="no-such-item"), "field 'item_id': unknown item 'no-such-item'"),
        (user_key, None, "empty payload"),
        (b"someone-else", variant(), "does not match user_id"),
        (None, variant(), "message key missing"),
        (user_key, msgpack.packb([1, 2, 3]), "payload must be a msgpack map"),
    ]
    # Over the message limit, and too big to be copied into a dead letter the broker would still take.
    oversized = b"\x00" * (pipeline.settings.max_message_bytes + 1)
    for index, event in enumerate(events):
        pipeline.send_raw(event.user_id.encode(), encode_event(event))
        if index % 30 == 0 and index // 30 < len(bad):
            key, value, _ = bad[index // 30]
            pipeline.send_raw(key, value)
    pipeline.send_raw(user_key, oversized)
    pipeline.producer.flush()

    event_ids = {e.event_id for e in events}
    bad_values = [value for _, value, _ in bad]

    def too_big(letters: list[DeadLetter]) -> list[DeadLetter]:
        return [d for d in letters if f"message of {len(oversized)} bytes exceeds the limit" in d.error]

    def done(out: object) -> bool:
        outputs = pipeline.outputs
        ours = [d for d in outputs.dead_letters if d.value in bad_values]
        return (
            event_ids <= outputs.covered_event_ids() and len(ours) >= len(bad) and bool(too_big(outputs.dead_letters))
        )

    outputs = pipeline.collect_until(done, timeout_s=120)

    # Every invalid message: exactly one dead letter, with its precise reason and original bytes.
    for key, value, reason in bad:
        letters = [d for d in outputs.dead_letters if d.value == value and d.key == key]
        assert len(letters) == 1, (reason, letters)
        assert reason in letters[0].error
        assert letters[0].topic == pipeline.settings.events_topic
    (uncopied,) = too_big(outputs.dead_letters)
    assert uncopied.value is None and uncopied.key is None, uncopied.error
    assert f"the original's {len(oversized) + len(user_key):,} bytes are not copied" in uncopied.error
    # Every valid event: reflected in a recommendation for its own user, never dead-lettered.
    user_of = {e.event_id: e.user_id for e in events}
    for rec in outputs.recommendations:
        for event_id in rec.event_ids:
            if event_id in user_of:
                assert user_of[event_id] == rec.user_id
    assert not [d for d in outputs.dead_letters if d.value in {encode_event(e) for e in events}]
    # A recommended item is never one the user has in the window.
    order = {e.event_id: i for i, e in enumerate(events)}
    window_after = _windows_at(events, pipeline.settings.window_size, pipeline.settings.window_horizon_s * 1000)
    ours = [r for r in outputs.recommendations if set(r.event_ids) <= event_ids]
    assert ours
    for rec in ours:
        window = window_after[_last_event_of(rec, order)]
        assert len(rec.items) == pipeline.settings.top_k
        assert not {i.item_id for i in rec.items} & set(window.item_ids), rec
        for item in rec.items:  # explained by window items, each named in the text by its title
            assert item.explained_by and set(item.explained_by) <= set(window.item_ids), item
            assert item.reason.startswith("because you ") and not any(i in item.reason for i in item.explained_by)


def _scripted(pipeline: Pipeline, user_index: int, segments: list[tuple[str, int]]) -> list[Event]:
    return [g.event for g in pipeline.workload.scripted_user(user_index, segments, clock=now_ms)]


def _recommendations_for(pipeline: Pipeline, events: list[Event]) -> list[Recommendation]:
    wanted = {e.event_id for e in events}
    outputs = pipeline.collect_until(lambda out: wanted <= out.accounted_event_ids(), timeout_s=60)
    return [r for r in outputs.recommendations if set(r.event_ids) & wanted]


def test_deleted_and_unavailable_items_are_never_recommended(pipeline: Pipeline) -> None:
    workload = pipeline.workload
    category = "gaming"
    # Items the user's category makes likely: the most popular ones it interacts with least.
    before = _scripted(pipeline, 500, [(category, 15)])
    pipeline.send_events(before)
    recommended_before = {i.item_id for r in _recommendations_for(pipeline, before) for i in r.items}
    targets = sorted(recommended_before)[:6]
    assert len(targets) == 6, "the category's items must be recommended before they are removed"
    deleted, unavailable = targets[:3], targets[3:]
    pipeline.delete_items(deleted)
    catalog = {item.item_id: item for item in workload.catalog}
    for item_id in unavailable:
        pipeline.producer.send(
            pipeline.settings.items_topic,
            key=item_id.encode(),
            value=encode_item(dataclasses.replace(catalog[item_id], available=False)),
        )
    pipeline.producer.flush()
    pipeline.wait_caught_up(pipeline.settings.items_topic)

    after = _scripted(pipeline, 501, [(category, 25)]) + _scripted(pipeline, 502, [(category, 25)])
    pipeline.send_events(after)
    recommended_after = [i.item_id for r in _recommendations_for(pipeline, after) for i in r.items]
    assert recommended_after
    # Events for a deleted item are dead-lettered as unknown items; the others are reflected.
    deleted_events = {e.event_id for e in after if e.item_id in deleted}
    assert deleted_events <= pipeline.outputs.dead_lettered_event_ids()
    assert {e.event_id for e in after} - deleted_events <= pipeline.outputs.covered_event_ids()
    assert not set(recommended_after) & set(targets)


def test_recommendations_follow_an_interest_switch(pipeline: Pipeline) -> None:
    """After a user switches category, most of the list follows within ``switch_events`` events."""
    switch_events = 3
    workload = pipeline.workload
    old, new = "kitchen", "camping"
    history = _scripted(pipeline, 600, [(old, 12)])
    pipeline.send_events(history)
    before = _recommendations_for(pipeline, history)[-1]
    assert sum(workload.category_of[i.item_id] == old for i in before.items) >= 6

    followed_after = None
    for n, event in enumerate(_scripted(pipeline, 601, [(new, 8)]), start=1):
        event = dataclasses.replace(event, user_id=history[0].user_id)
        pipeline.send_events([event])
        rec = _recommendations_for(pipeline, [event])[-1]
        if sum(workload.category_of[i.item_id] == new for i in rec.items) >= 6:
            followed_after = n
            break
    assert followed_after is not None and followed_after <= switch_events, followed_after


def test_invalid_catalog_changes_are_dead_lettered(pipeline: Pipeline) -> None:
    item = pipeline.workload.catalog[0]
    too_long = msgpack.packb({**msgpack.unpackb(encode_item(item)), "description": "x" * 30_000})
    no_title = msgpack.packb({**msgpack.unpackb(encode_item(item)), "title": None})
    for value in (too_long, no_title):
        pipeline.producer.send(pipeline.settings.items_topic, key=item.item_id.encode(), value=value)
    pipeline.producer.send(pipeline.settings.items_topic, key=b"", value=None)  # a tombstone naming no item
    pipeline.producer.flush()
    outputs = pipeline.collect_until(
        lambda out: sum(d.topic == pipeline.settings.items_topic for d in out.dead_letters) >= 3
    )
    errors = sorted(d.error for d in outputs.dead_letters if d.topic == pipeline.settings.items_topic)
    assert any("field 'description': 30000 characters exceeds the limit" in e for e in errors), errors
    assert any("field 'title': missing" in e for e in errors), errors
    assert any("tombstone (null value) needs the item_id as its key" in e for e in errors), errors


def _user_who_saw_what_newcomers_get(pipeline: Pipeline, user_index: int) -> tuple[list[str], list[Event]]:
    """Items a gaming newcomer is recommended (what a fresh window surfaces), and the events of
    user ``user_index`` (40 gaming events), whose first ones are exactly those items."""
    probe = _scripted(pipeline, user_index - 1, [("gaming", 12)])
    pipeline.send_events(probe)
    likely = [i.item_id for i in _recommendations_for(pipeline, probe)[-1].items]
    template = _scripted(pipeline, user_index, [("gaming", 40)])
    seen = [dataclasses.replace(e, item_id=item) for e, item in zip(template, likely, strict=False)]
    return likely, seen + template[len(seen) :]


def test_a_restarted_worker_resumes_with_the_windows_from_the_changelog(pipeline: Pipeline) -> None:
    likely, template = _user_who_saw_what_newcomers_get(pipeline, 701)
    # The user interacts with exactly those items, then the worker restarts.
    before = template[: len(likely)]
    pipeline.send_events(before)
    _recommendations_for(pipeline, before)
    pipeline.restart_worker()
    # The next event is for an item still in the catalogue (other tests delete some).
    after = next(e for e in template[len(likely) :] if e.item_id not in pipeline.deleted | set(likely))
    pipeline.send_events([after])
    rec = _recommendations_for(pipeline, [after])[-1]
    # Only a window restored from the changelog still holds the items seen before the restart:
    # a fresh user sending the very same event is recommended some of them.
    assert not {i.item_id for i in rec.items} & set(likely), rec
    control = dataclasses.replace(after, user_id="control-user-702", event_id=f"{after.event_id}-control")
    pipeline.send_events([control])
    assert {i.item_id for i in _recommendations_for(pipeline, [control])[-1].items} & set(likely)


def test_a_forgotten_user_leaves_only_the_time_erased_up_to_and_starts_afresh(pipeline: Pipeline) -> None:
    likely, template = _user_who_saw_what_newcomers_get(pipeline, 721)
    returning = template[: len(likely)]
    gone = _scripted(pipeline, 722, [("running", 5)])
    pipeline.send_events(returning + gone)
    _recommendations_for(pipeline, returning + gone)

    settings = pipeline.settings
    flags = ["--kafka-bootstrap", settings.kafka_bootstrap, "--control-topic", settings.control_topic]
    assert main([*flags, "forget", returning[0].user_id, " "]) == 2  # refused as the worker would: nothing sent
    assert main([*flags, "forget", returning[0].user_id, gone[0].user_id]) == 0
    after = next(e for e in template[len(likely) :] if e.item_id not in pipeline.deleted | set(likely))
    after = dataclasses.replace(after, ts=now_ms())  # the user's first event since the request
    fresh = dataclasses.replace(after, user_id="fresh-user-723", event_id=f"{after.event_id}-fresh")
    pipeline.send_events([after, fresh, gone[0]])  # gone[0]: an erased event, sent again as a replay would
    recs = _recommendations_for(pipeline, [after, fresh])
    by_user = {r.user_id: [i.item_id for i in r.items] for r in recs}
    # The forgotten user's window holds only the new event: their list is a newcomer's.
    assert by_user[after.user_id] == by_user[fresh.user_id]
    assert set(by_user[after.user_id]) & set(likely)

    pipeline.wait_caught_up(settings.events_topic)
    pipeline.wait_caught_up(settings.control_topic)
    latest = pipeline.stored_windows({after.user_id.encode(), gone[0].user_id.encode()})
    marker = UserWindow.from_bytes(latest[gone[0].user_id.encode()], 50, 10**12, 500)  # type: ignore[arg-type]
    assert len(marker) == 0 and marker.forgotten_until >= gone[-1].ts  # no event kept, the replay refused
    window = UserWindow.from_bytes(latest[after.user_id.encode()], 50, 10**12, 500)  # type: ignore[arg-type]
    assert window.item_ids == [after.item_id]


def test_windows_kept_on_disk_by_rocksdb_survive_a_restart(
    kafka: LocalKafka, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("rocksdb")
    on_disk = Pipeline(kafka.config.bootstrap, models_dir, home, table_store="rocksdb://", topic_partitions=4)
    try:
        on_disk.start()
        on_disk.publish_catalog()
        users = [_scripted(on_disk, 730 + n, [("music", 5)]) for n in range(12)]
        events = [e for user in users for e in user]
        on_disk.send_events(events)
        _recommendations_for(on_disk, events)
        assert any(on_disk.settings.faust_data_path.rglob("*.sst")) or any(
            on_disk.settings.faust_data_path.rglob("CURRENT")
        )  # RocksDB files, one database per partition
        on_disk.restart_worker()
        # Each user's next event lands on a window that still holds their five earlier ones.
        follow_ups = [dataclasses.replace(user[-1], event_id=f"{user[-1].event_id}-next") for user in users]
        on_disk.send_events(follow_ups)
        on_disk.wait_caught_up(on_disk.settings.events_topic)
        stored = on_disk.stored_windows({user[0].user_id.encode() for user in users})
        for user in users:
            window = UserWindow.from_bytes(stored[user[0].user_id.encode()], 50, 10**12, 500)  # type: ignore[arg-type]
            assert len(window) == 6, user[0].user_id
    finally:
        on_disk.stop()


def test_a_micro_batch_starts_with_what_has_arrived_instead_of_waiting_to_fill(
    kafka: LocalKafka, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With ``batch_within_s`` far longer than the test waits, lists still come: a batch is taken once no
    event has joined it for a moment (Faust's own take_events would hold each batch for the whole 60 s)."""
    waiting = Pipeline(kafka.config.bootstrap, models_dir, tmp_path_factory.mktemp("greedy"), batch_within_s=60.0)
    try:
        waiting.start()
        waiting.publish_catalog()
        lone = _scripted(waiting, 760, [("music", 1)])
        waiting.send_events(lone)
        waiting.collect_until(lambda out: lone[0].event_id in out.covered_event_ids(), timeout_s=20)
        burst = [e for n in range(8) for e in _scripted(waiting, 770 + n, [("gaming", 5)])]
        waiting.send_events(burst)
        wanted = {e.event_id for e in burst}
        waiting.collect_until(lambda out: wanted <= out.accounted_event_ids(), timeout_s=20)
    finally:
        waiting.stop()
