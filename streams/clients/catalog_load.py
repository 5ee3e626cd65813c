"""`rtrec load-items`: a catalogue file (CSV, JSONL or Parquet) onto the items topic.

Every row is read and checked first, with the worker's own decoder; a file with
any bad row sends nothing and the error names each bad line. Then the items are
published with progress shown, and the command waits (``wait``) until the
worker group has embedded all of them.

Columns: ``item_id`` and ``title`` (required), ``description``, ``category``,
``tags`` (a list, or ``a|b|c`` in CSV), ``price``, ``available`` (true/false,
default true), ``ts`` (epoch s or ms; default: now).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encoder.datasets import read_table
from streams.clients.helpers import Publisher
from streams.errors import DataError, InvalidRecord
from streams.records import Item, Limits, decode_item, encode_item

MAX_PROBLEMS_SHOWN = 10
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value).strip()


def _tags(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split("|") if t.strip())
    if isinstance(value, list | tuple) and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise InvalidRecord("expected a list of strings or 'a|b|c'", "tags")


def _price(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRecord(f"expected a number, got {value!r}", "price") from None


def _available(value: Any) -> bool:
    if value is None or value == "" or isinstance(value, bool):
        return value is not False
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InvalidRecord(f"expected true or false, got {value!r}", "available")


def _ts(value: Any, now_ms: int) -> int:
    if value is None or value == "":
        return now_ms
    try:
        ts = float(value)
    except (TypeError, ValueError):
        raise InvalidRecord(f"expected epoch seconds or milliseconds, got {value!r}", "ts") from None
    return int(ts * 1000) if ts < 1e11 else int(ts)  # 1e11 s is the year 5138; 1e11 ms is 1973


def item_from_row(row: dict[str, Any], now_ms: int, limits: Limits) -> Item:
    """The item a row describes, checked as the worker will check it (``InvalidRecord`` otherwise)."""
    item = Item(
        item_id=_text(row, "item_id"),
        title=_text(row, "title"),
        ts=_ts(row.get("ts"), now_ms),
        description=_text(row, "description"),
        category=_text(row, "category"),
        tags=_tags(row.get("tags")),
        price=_price(row.get("price")),
        available=_available(row.get("available")),
    )
    decode_item(encode_item(item), item.item_id.encode("utf-8"), limits)
    return item


def read_items(path: Path, now_ms: int, limits: Limits) -> list[Item]:
    """Every item of the file, or ``DataError`` listing the bad lines (nothing is half-read)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    items: list[Item] = []
    problems: list[str] = []
    bad = 0
    for number, row in read_table(path):
        try:
            items.append(item_from_row(row, now_ms, limits))
        except InvalidRecord as exc:
            bad += 1
            if len(problems) < MAX_PROBLEMS_SHOWN:
                problems.append(f"{path}:{number}: {exc.reason}")
    if bad:
        more = f" (and {bad - len(problems)} more)" if bad > len(problems) else ""
        raise DataError(f"{bad} bad row(s), nothing sent{more}:\n  " + "\n  ".join(problems))
    if not items:
        raise DataError(f"{path}: no items")
    return items


def publish_catalog(publisher: Publisher, items: list[Item], say: Callable[[str], None], every_s: float = 2.0) -> float:
    """Publish with progress lines; returns the seconds it took."""
    started = last = time.monotonic()
    for n, item in enumerate(items, start=1):
        publisher.publish_item(item)
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            say(f"  {n:,} / {len(items):,} items sent ({n / (last - started):,.0f}/s)")
    publisher.flush()
    return time.monotonic() - started
