"""The topic contracts: round trips, pinned bytes of version 1, and precise errors for bad input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.errors import InvalidRecord
from streams.records import (
    ControlCommand,
    DeadLetter,
    Event,
    Item,
    Limits,
    Recommendation,
    RecommendedItem,
    decode_control,
    decode_deadletter,
    decode_event,
    decode_item,
    decode_recommendation,
    encode_control,
    encode_deadletter,
    encode_event,
    encode_item,
    encode_recommendation,
)

LIMITS = Limits()
EVENT = Event(event_id="e-1", user_id="u-1", item_id="i-1", type="click", ts=1_700_000_000_000, value=4.5)
KEY = b"u-1"


def _event_bytes(**changes: object) -> bytes:
    return msgpack.packb({**msgpack.unpackb(encode_event(EVENT)), **changes})


def test_event_round_trip_and_pinned_v1_bytes() -> None:
    raw = encode_event(EVENT)
    assert decode_event(raw, KEY, LIMITS) == EVENT
    # Version 1 on the wire, pinned: a change here breaks every producer already deployed.
    assert raw.hex() == (
        "87a17601a86576656e745f6964a3652d31a7757365725f6964a3752d31a76974656d5f6964a3692d31a474797065a5636c69636b"
        "a27473cf0000018bcfe56800a576616c7565cb4012000000000000"
    )


def test_other_records_round_trip() -> None:
    item = Item("i-1", "Trail shoes", 1, description="grippy", category="running", tags=("shoes",), price=9.5)
    assert decode_item(encode_item(item), b"i-1", LIMITS) == item
    shown = RecommendedItem("i-2", 0.5, "because you viewed Trail shoes", ("i-1",))
    rec = Recommendation("u-1", (shown,), "m1", "e-1", 1, 2, ("e-1",))
    assert decode_recommendation(encode_recommendation(rec)) == rec
    letter = DeadLetter("rec.events", 3, 42, "field 'ts': missing", b"k", b"\x00", 5)
    assert decode_deadletter(encode_deadletter(letter)) == letter
    command = ControlCommand("forget_user", "u-1", 7)
    assert decode_control(encode_control(command), b"u-1", LIMITS) == command


def test_a_recommendation_from_before_explained_by_still_decodes() -> None:
    older = msgpack.packb(
        {"v": 1, "user_id": "u", "items": [{"item_id": "i", "score": 1.0, "reason": "because you viewed j"}],
         "model": "m", "trigger_event_id": "e", "event_ts": 1, "emitted_ts": 2},
    )  # fmt: skip
    assert decode_recommendation(older).items == (RecommendedItem("i", 1.0, "because you viewed j", ()),)


@pytest.mark.parametrize(
    ("raw", "key", "reason"),
    [
        (encode_event(EVENT)[:-4], KEY, "not a msgpack payload"),
        (b"\xc1", KEY, "not a msgpack payload"),
        (None, KEY, "empty payload"),
        (msgpack.packb([1, 2]), KEY, "payload must be a msgpack map, got list"),
        (_event_bytes(v=None), KEY, "field 'v': missing schema version"),
        (_event_bytes(v="1"), KEY, "field 'v': expected int, got str"),
        (_event_bytes(v=2), KEY, "field 'v': unsupported schema version 2 (this worker reads 1)"),
        (_event_bytes(type="teleport"), KEY, "field 'type': unknown event type 'teleport'"),
        (_event_bytes(type=None), KEY, "field 'type': missing"),
        (_event_bytes(user_id=7), KEY, "field 'user_id': expected string, got int"),
        (_event_bytes(item_id=None), KEY, "field 'item_id': missing"),
        (_event_bytes(event_id="  "), KEY, "field 'event_id': empty"),
        (_event_bytes(item_id="x" * 300), KEY, "field 'item_id': 300 characters exceeds the limit of 256"),
        (_event_bytes(ts=1.5), KEY, "field 'ts': expected int epoch milliseconds, got float"),
        (_event_bytes(ts=-5), KEY, "field 'ts': must be a positive epoch-milliseconds value"),
        (_event_bytes(ts=True), KEY, "field 'ts': expected int epoch milliseconds, got bool"),
        (_event_bytes(value="high"), KEY, "field 'value': expected number, got str"),
        (_event_bytes(value=float("nan")), KEY, "field 'value': must be finite"),
        (_event_bytes(context=[1]), KEY, "field 'context': expected map, got list"),
        (encode_event(EVENT), b"u-2", "message key b'u-2' does not match user_id 'u-1'"),
        (encode_event(EVENT), None, "message key missing"),
        (b"\x00" * 2_000_000, KEY, "message of 2000000 bytes exceeds the limit of 1000000"),
    ],
)
def test_bad_events_are_rejected_with_a_precise_reason(raw: bytes | None, key: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidRecord) as caught:
        decode_event(raw, key, LIMITS)
    assert reason in caught.value.reason


def test_future_timestamps_are_bounded_by_the_skew_limit() -> None:
    now = EVENT.ts
    assert decode_event(_event_bytes(ts=now + 3_600_000), KEY, LIMITS, now_ms=now).ts == now + 3_600_000
    with pytest.raises(InvalidRecord, match="in the future"):
        decode_event(_event_bytes(ts=now + 2 * 86_400_000), KEY, LIMITS, now_ms=now)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"title": None}, "field 'title': missing"),
        ({"title": "   "}, "field 'title': empty"),
        ({"description": "x" * 20_001}, "field 'description': 20001 characters exceeds the limit of 20000"),
        ({"tags": "shoes"}, "field 'tags': expected a list of strings"),
        ({"available": "yes"}, "field 'available': expected bool, got str"),
        ({"price": "cheap"}, "field 'price': expected number, got str"),
    ],
)
def test_bad_items_are_rejected_with_a_precise_reason(changes: dict[str, object], reason: str) -> None:
    base = msgpack.unpackb(encode_item(Item("i-1", "Trail shoes", 1)))
    with pytest.raises(InvalidRecord) as caught:
        decode_item(msgpack.packb({**base, **changes}), b"i-1", LIMITS)
    assert reason in caught.value.reason


def test_combined_item_text_is_bounded() -> None:
    item = Item("i-1", "t" * 15_000, 1, description="d" * 15_000)
    with pytest.raises(InvalidRecord, match="item text of 30002 characters exceeds the limit of 20000"):
        decode_item(encode_item(item), b"i-1", LIMITS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_invalid_record(raw: bytes) -> None:
    for decode, key in ((decode_event, KEY), (decode_item, b"i"), (decode_control, KEY)):
        try:
            decode(raw, key, LIMITS)
        except InvalidRecord as exc:
            assert exc.reason


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["v", "event_id", "user_id", "item_id", "type", "ts", "value", "context"]), _values)
)
def test_arbitrary_maps_are_valid_events_or_precise_errors(fields: dict[str, object]) -> None:
    raw = msgpack.packb(fields, use_bin_type=True)
    try:
        event = decode_event(raw, KEY, LIMITS)
    except InvalidRecord as exc:
        assert exc.reason
    else:
        assert event.user_id == "u-1" and isinstance(event.ts, int)
