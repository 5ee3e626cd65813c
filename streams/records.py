"""Versioned msgpack records: the contracts of every topic, validated at the edge.

Each payload is a msgpack map with a schema version ``v``. Decoding is strict:
unknown versions, unknown event types, wrong types and oversized fields raise
``InvalidRecord`` with a precise reason, which the stream turns into a
dead-letter record. New fields may only ever be optional.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from streams.errors import InvalidRecord

SCHEMA_VERSION = 1
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating", "dislike", "skip", "return")
# What a user turned away from: similar items sink in their list (streams.rerank), and no reason names them.
REJECTION_TYPES = frozenset({"dislike", "skip", "return"})
CONTROL_COMMANDS = ("forget_user",)


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits applied at decode time (from ``Settings``)."""

    max_message_bytes: int = 1_000_000
    max_id_chars: int = 256
    max_text_chars: int = 20_000
    max_future_skew_s: int = 24 * 3600


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    type: str
    ts: int  # event time, epoch milliseconds
    value: float | None = None
    context: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    ts: int
    description: str = ""
    category: str = ""
    tags: tuple[str, ...] = ()
    price: float | None = None
    available: bool = True

    def text(self) -> str:
        """The text the text encoder embeds: what a shopper would read about the item."""
        parts = [self.title, self.category, self.description, ", ".join(self.tags)]
        return ". ".join(p for p in parts if p)

    def payload(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "title": self.title,
            "category": self.category,
            "tags": list(self.tags),
            "price": self.price,
            "available": self.available,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    item_id: str
    score: float
    reason: str  # for people: "because you rated Heat (1995)"
    # For programs: the ids of the window items the reason names (optional in schema v1; () when absent).
    explained_by: tuple[str, ...] = ()
    # In an interleaved experiment, the variant that contributed the item (optional in schema v1).
    team: str | None = None


@dataclass(frozen=True, slots=True)
class Recommendation:
    user_id: str
    items: tuple[RecommendedItem, ...]
    model: str
    trigger_event_id: str
    event_ts: int
    emitted_ts: int
    # Every event id this refresh accounts for (the user's events in the micro-batch).
    event_ids: tuple[str, ...] = ()
    # The experiment and variant that produced the list (optional in schema v1; None outside experiments).
    # An interleaved list names both variants, "a+b", and each item its team.
    experiment: str | None = None
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    error: str
    key: bytes | None
    value: bytes | None
    ts: int


@dataclass(frozen=True, slots=True)
class ControlCommand:
    command: str
    user_id: str
    ts: int


# ---------------------------------------------------------------- decoding


def _unpack(raw: bytes | None, limits: Limits) -> dict[str, Any]:
    if raw is None:
        raise InvalidRecord("empty payload")
    if len(raw) > limits.max_message_bytes:
        raise InvalidRecord(f"message of {len(raw)} bytes exceeds the limit of {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise InvalidRecord(f"not a msgpack payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise InvalidRecord(f"payload must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if version is None:
        raise InvalidRecord("missing schema version", "v")
    if type(version) is not int:
        raise InvalidRecord(f"expected int, got {type(version).__name__}", "v")
    if version != SCHEMA_VERSION:
        raise InvalidRecord(f"unsupported schema version {version} (this worker reads {SCHEMA_VERSION})", "v")
    return obj


def _id(obj: Mapping[str, Any], name: str, limits: Limits) -> str:
    value = obj.get(name)
    if value is None:
        raise InvalidRecord("missing", name)
    if not isinstance(value, str):
        raise InvalidRecord(f"expected string, got {type(value).__name__}", name)
    if not value.strip():
        raise InvalidRecord("empty", name)
    if len(value) > limits.max_id_chars:
        raise InvalidRecord(f"{len(value)} characters exceeds the limit of {limits.max_id_chars}", name)
    return value


def _text(obj: Mapping[str, Any], name: str, limits: Limits, *, required: bool = False) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidRecord("missing", name)
        return ""
    if not isinstance(value, str):
        raise InvalidRecord(f"expected string, got {type(value).__name__}", name)
    if len(value) > limits.max_text_chars:
        raise InvalidRecord(f"{len(value)} characters exceeds the limit of {limits.max_text_chars}", name)
    return value


def _timestamp(obj: Mapping[str, Any], name: str, limits: Limits, now_ms: int | None) -> int:
    value = obj.get(name)
    if value is None:
        raise InvalidRecord("missing", name)
    if type(value) is not int:
        raise InvalidRecord(f"expected int epoch milliseconds, got {type(value).__name__}", name)
    if value <= 0:
        raise InvalidRecord(f"must be a positive epoch-milliseconds value, got {value}", name)
    if now_ms is not None and value > now_ms + limits.max_future_skew_s * 1000:
        raise InvalidRecord(f"{value} is more than {limits.max_future_skew_s} s in the future", name)
    return value


def _number(obj: Mapping[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRecord(f"expected number, got {type(value).__name__}", name)
    if not math.isfinite(value):
        raise InvalidRecord("must be finite", name)
    return float(value)


def _key_matches(key: bytes | None, value: str, name: str) -> None:
    if key is not None and key != value.encode("utf-8"):
        raise InvalidRecord(f"message key {key[:64]!r} does not match {name} {value[:64]!r}")


def decode_event(raw: bytes | None, key: bytes | None, limits: Limits, now_ms: int | None = None) -> Event:
    """Decode and validate one ``rec.events`` payload (``now_ms`` bounds future timestamps)."""
    if key is None:
        # A keyless event lands on an arbitrary partition, away from the rest of its user's state.
        raise InvalidRecord("message key missing: events must be keyed by user_id")
    obj = _unpack(raw, limits)
    event_type = obj.get("type")
    if event_type is None:
        raise InvalidRecord("missing", "type")
    if event_type not in EVENT_TYPES:
        raise InvalidRecord(f"unknown event type {str(event_type)[:64]!r} (known: {', '.join(EVENT_TYPES)})", "type")
    context = obj.get("context")
    if context is not None and not isinstance(context, dict):
        raise InvalidRecord(f"expected map, got {type(context).__name__}", "context")
    event = Event(
        event_id=_id(obj, "event_id", limits),
        user_id=_id(obj, "user_id", limits),
        item_id=_id(obj, "item_id", limits),
        type=event_type,
        ts=_timestamp(obj, "ts", limits, now_ms),
        value=_number(obj, "value"),
        context=context,
    )
    _key_matches(key, event.user_id, "user_id")
    return event


def decode_item(raw: bytes | None, key: bytes | None, limits: Limits) -> Item:
    """Decode and validate one ``rec.items`` upsert (a tombstone is handled by the caller)."""
    obj = _unpack(raw, limits)
    tags = obj.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidRecord("expected a list of strings", "tags")
    available = obj.get("available", True)
    if not isinstance(available, bool):
        raise InvalidRecord(f"expected bool, got {type(available).__name__}", "available")
    title = _text(obj, "title", limits, required=True)
    if not title.strip():
        raise InvalidRecord("empty", "title")
    item = Item(
        item_id=_id(obj, "item_id", limits),
        title=title,
        ts=_timestamp(obj, "ts", limits, None),
        description=_text(obj, "description", limits),
        category=_text(obj, "category", limits),
        tags=tuple(tags),
        price=_number(obj, "price"),
        available=available,
    )
    if len(item.text()) > limits.max_text_chars:
        raise InvalidRecord(f"item text of {len(item.text())} characters exceeds the limit of {limits.max_text_chars}")
    _key_matches(key, item.item_id, "item_id")
    return item


def decode_control(raw: bytes | None, key: bytes | None, limits: Limits) -> ControlCommand:
    obj = _unpack(raw, limits)
    command = obj.get("command")
    if command not in CONTROL_COMMANDS:
        raise InvalidRecord(f"unknown command {str(command)[:64]!r} (known: {', '.join(CONTROL_COMMANDS)})", "command")
    result = ControlCommand(
        command=command, user_id=_id(obj, "user_id", limits), ts=_timestamp(obj, "ts", limits, None)
    )
    _key_matches(key, result.user_id, "user_id")
    return result


def decode_recommendation(raw: bytes) -> Recommendation:
    """Decode a ``rec.recommendations`` payload (for consumers and tests)."""
    obj = _unpack(raw, Limits(max_message_bytes=len(raw)))
    try:
        return Recommendation(
            user_id=obj["user_id"],
            items=tuple(
                RecommendedItem(
                    i["item_id"], float(i["score"]), i["reason"], tuple(i.get("explained_by", ())), i.get("team")
                )
                for i in obj["items"]
            ),
            model=obj["model"],
            trigger_event_id=obj["trigger_event_id"],
            event_ts=obj["event_ts"],
            emitted_ts=obj["emitted_ts"],
            event_ids=tuple(obj.get("event_ids", ())),
            experiment=obj.get("experiment"),
            variant=obj.get("variant"),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidRecord(f"malformed recommendation ({type(exc).__name__}: {exc})") from None


def decode_deadletter(raw: bytes) -> DeadLetter:
    obj = _unpack(raw, Limits(max_message_bytes=len(raw)))
    try:
        return DeadLetter(
            topic=obj["topic"],
            partition=obj["partition"],
            offset=obj["offset"],
            error=obj["error"],
            key=obj["key"],
            value=obj["value"],
            ts=obj["ts"],
        )
    except KeyError as exc:
        raise InvalidRecord(f"malformed dead-letter record (missing {exc})") from None


# ---------------------------------------------------------------- encoding


def _pack(fields: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **fields}, use_bin_type=True)


def encode_event(event: Event) -> bytes:
    fields: dict[str, Any] = {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "type": event.type,
        "ts": event.ts,
    }
    if event.value is not None:
        fields["value"] = event.value
    if event.context is not None:
        fields["context"] = dict(event.context)
    return _pack(fields)


def encode_item(item: Item) -> bytes:
    return _pack({**item.payload(), "description": item.description})


def encode_control(command: ControlCommand) -> bytes:
    return _pack({"command": command.command, "user_id": command.user_id, "ts": command.ts})


def encode_recommendation(rec: Recommendation) -> bytes:
    fields: dict[str, Any] = {
        "user_id": rec.user_id,
        "items": [_recommended_item(i) for i in rec.items],
        "model": rec.model,
        "trigger_event_id": rec.trigger_event_id,
        "event_ts": rec.event_ts,
        "emitted_ts": rec.emitted_ts,
        "event_ids": list(rec.event_ids),
    }
    if rec.experiment is not None:  # lists outside experiments stay as they were
        fields |= {"experiment": rec.experiment, "variant": rec.variant}
    return _pack(fields)


def _recommended_item(item: RecommendedItem) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "item_id": item.item_id,
        "score": item.score,
        "reason": item.reason,
        "explained_by": list(item.explained_by),
    }
    if item.team is not None:
        fields["team"] = item.team
    return fields


def encode_deadletter(letter: DeadLetter) -> bytes:
    return _pack(
        {
            "topic": letter.topic,
            "partition": letter.partition,
            "offset": letter.offset,
            "error": letter.error,
            "key": letter.key,
            "value": letter.value,
            "ts": letter.ts,
        }
    )
