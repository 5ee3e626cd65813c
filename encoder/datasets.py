"""Loaders for the data sets we evaluate on, each into a leave-one-out ``Dataset``.

Formats (``--format``):
- ``s3rec``: one line per user, ``user item item …`` in time order (Amazon Beauty as
  prepared for S3-Rec); a file, or a folder holding exactly one ``.txt``.
- ``sasrec``: the gSASRec preparation of MovieLens-1M: ``train/input.txt``,
  ``test/output.txt`` and the 512 validation users in ``val/``.
- ``unisrec``: Amazon in UniSRec format: ``X.text``, ``X.item2index`` and
  ``X.{valid,test}.inter`` (item text, so cold items are scored by their text).
- ``ml-100k``: the raw MovieLens 100K release (``u.data``, ``u.item``), with times and titles.
- ``generic``: CSV, JSONL or Parquet events with columns ``user_id``, ``item_id`` and
  optionally ``type`` and ``ts`` (epoch seconds or milliseconds); ``--items`` adds a
  file of ``item_id``, ``text``.

Every malformed input is a ``DataError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from encoder.data import Dataset, EventLog, Example, History, leave_one_out
from streams.errors import DataError

FORMATS = ("s3rec", "sasrec", "unisrec", "ml-100k", "generic")
TIMED_FORMATS = ("ml-100k", "generic")
ORDER_ONLY_TYPE = "view"  # the event type given to data sets that record none
SECONDS_VS_MS = 100_000_000_000  # epoch values below this are seconds (until the year 5138)


def load_event_log(path: Path, fmt: str, items: Path | None = None) -> EventLog:
    """A timestamped log (``ml-100k`` or ``generic`` with ``ts``), for replaying through the stream."""
    if fmt not in TIMED_FORMATS:
        raise DataError(f"a replay needs event times: --format {' or '.join(TIMED_FORMATS)}, not {fmt!r}")
    _check_inputs(path, fmt, items)
    log = ml100k_log(path) if fmt == "ml-100k" else generic_log(path, items)
    if not log.has_time:
        raise DataError(f"{path}: a replay needs a ts on every event")
    return log


def load_dataset(path: Path, fmt: str, items: Path | None = None) -> Dataset:
    loaders: dict[str, Callable[[Path], Dataset]] = {
        "s3rec": load_s3rec,
        "sasrec": load_sasrec,
        "unisrec": load_unisrec,
        "ml-100k": load_ml100k,
        "generic": lambda p: load_generic(p, items),
    }
    if fmt not in loaders:
        raise DataError(f"unknown data format {fmt!r}; one of {', '.join(FORMATS)}")
    _check_inputs(path, fmt, items)
    return loaders[fmt](path)


def _check_inputs(path: Path, fmt: str, items: Path | None) -> None:
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if items is not None and fmt != "generic":
        raise DataError("--items goes with --format generic only; the other formats carry their own text")


class ItemCatalogue:
    """External item ids → catalogue rows, in order of first appearance."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._rows: dict[str, int] = {}

    def row(self, item_id: str) -> int:
        found = self._rows.get(item_id)
        if found is None:
            found = self._rows[item_id] = len(self.ids)
            self.ids.append(item_id)
        return found

    def known(self, item_id: str) -> int | None:
        return self._rows.get(item_id)


def order_only(rows: list[int]) -> History:
    return History(np.array(rows, dtype=np.int64), [ORDER_ONLY_TYPE] * len(rows), np.zeros(len(rows), dtype=np.int64))


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding=encoding) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line.rstrip("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not {encoding} text ({exc.reason})") from None


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise DataError(f"{folder}: expected exactly one {pattern} file, found {len(found)}")
    return found[0]


def load_s3rec(path: Path) -> Dataset:
    file = _single(path, "*.txt") if path.is_dir() else path
    catalogue = ItemCatalogue()
    histories: dict[str, History] = {}
    for number, line in _lines(file):
        user, *items = line.split()
        if not items:
            raise DataError(f"{file}:{number}: user {user} has no items")
        if user in histories:
            raise DataError(f"{file}:{number}: user {user} appears twice")
        histories[user] = order_only([catalogue.row(i) for i in items])
    if not histories:
        raise DataError(f"{file}: no users")
    return leave_one_out(file.stem, catalogue.ids, histories)


def _id_lines(file: Path) -> list[list[str]]:
    return [line.split() for _, line in _lines(file)]


def load_sasrec(path: Path) -> Dataset:
    """MovieLens-1M as prepared for gSASRec.

    Line i of ``train/input.txt`` and ``test/output.txt`` is user i. The 512 users in
    ``val/`` have their full history there (the training line plus its last item), and
    their validation target; the other users' lines lack the item before the test target.
    Those users' last training item is held out as their validation target (trained on only
    by a refit), so that choices made on validation see every user, not 512.
    """
    files = {name: path / name for name in ("train/input.txt", "test/output.txt", "val/input.txt", "val/output.txt")}
    for file in files.values():
        if not file.exists():
            raise DataError(f"{path}: missing {file.relative_to(path)} (is this the SASRec preparation?)")
    train_lines = _id_lines(files["train/input.txt"])
    test_targets = _id_lines(files["test/output.txt"])
    val_inputs, val_targets = _id_lines(files["val/input.txt"]), _id_lines(files["val/output.txt"])
    if len(train_lines) != len(test_targets) or len(val_inputs) != len(val_targets):
        raise DataError(f"{path}: input and output files differ in length")
    by_prefix: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for user, line in enumerate(train_lines):
        by_prefix[tuple(line)].append(user)
    full_history = {}
    valid_target = {}
    for number, (val_input, target) in enumerate(zip(val_inputs, val_targets, strict=True), start=1):
        users = by_prefix.get(tuple(val_input[:-1]), [])
        if len(users) != 1 or len(target) != 1:
            raise DataError(f"{files['val/input.txt']}:{number}: matches no single training line")
        full_history[users[0]] = val_input
        valid_target[users[0]] = target[0]
    rows = sorted({int(i) for line in train_lines + val_inputs + val_targets + test_targets for i in line})
    catalogue = ItemCatalogue()
    for row in rows:
        catalogue.row(str(row))
    train: list[History] = []
    valid: list[Example] = []
    test: list[Example] = []
    for user, line in enumerate(train_lines):
        if len(test_targets[user]) != 1:
            raise DataError(f"{files['test/output.txt']}:{user + 1}: expected one item id")
        history = order_only([catalogue.row(i) for i in full_history.get(user, line)])
        if user in valid_target:
            valid_row = catalogue.row(valid_target[user])
            history = order_only([*history.items.tolist(), valid_row])
        if len(history) >= 2:
            train.append(history.head(len(history) - 1))
            valid.append(Example(str(user + 1), train[-1], int(history.items[-1])))
        else:
            train.append(history)
        test.append(Example(str(user + 1), history, catalogue.row(test_targets[user][0])))
    # Each test history is the user's training line, extended by the validation target where there is one.
    dataset = Dataset(path.name, catalogue.ids, train, valid, test, train_and_valid=[e.history for e in test])
    dataset.test_groups["complete"] = np.array([user in valid_target for user in range(len(test))])
    dataset.notes.append(
        "ML-1M (gSASRec preparation): apart from the 512 validation users, each user's history lacks the "
        "item just before the test target, so the task is harder than full leave-one-out. The 'complete' "
        "columns score only those 512 users, whose test histories are complete: the published protocol. "
        "The other users' validation target is their last training item, held out (a refit learns it)."
    )
    return dataset


def load_unisrec(path: Path) -> Dataset:
    text_file = _single(path, "*.text")
    stem = text_file.name[: -len(".text")]
    index_file = path / f"{stem}.item2index"
    texts: dict[str, str] = {}
    for number, line in _lines(text_file):
        if number == 1 and line.startswith("item_id:"):
            continue
        item, sep, text = line.partition("\t")
        if not sep:
            raise DataError(f"{text_file}:{number}: expected 'item_id<TAB>text'")
        texts[item] = text.strip()
    rows: dict[int, str] = {}
    for number, line in _lines(index_file):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{index_file}:{number}: expected 'item_id<TAB>index'")
        rows[int(parts[1])] = parts[0]
    if sorted(rows) != list(range(len(rows))):
        raise DataError(f"{index_file}: indices are not 0..{len(rows) - 1}")
    item_ids = [rows[i] for i in range(len(rows))]
    missing = [i for i in item_ids if i not in texts]
    if missing:
        raise DataError(f"{text_file}: no text for {len(missing)} items, e.g. {missing[0]}")

    def examples(kind: str) -> list[Example]:
        file = path / f"{stem}.{kind}.inter"
        out = []
        for number, line in _lines(file):
            if number == 1 and line.startswith("user_id:"):
                continue
            parts = line.split("\t")
            try:
                user, history, target = parts[0], [int(i) for i in parts[1].split()], int(parts[2])
            except (IndexError, ValueError):
                raise DataError(f"{file}:{number}: expected 'user<TAB>item item …<TAB>item'") from None
            if target not in rows or any(i not in rows for i in history):
                raise DataError(f"{file}:{number}: item index outside {index_file.name}")
            out.append(Example(user, order_only(history), target))
        return out

    valid, test = examples("valid"), examples("test")
    dataset = Dataset(
        stem,
        item_ids,
        [e.history for e in valid],
        valid,
        test,
        [texts[i] for i in item_ids],
        train_and_valid=[e.history for e in test],
    )
    dataset.notes.append(f"{stem}: items only seen as a validation or test target are cold (text only).")
    return dataset


def load_ml100k(path: Path) -> Dataset:
    return ml100k_log(path).split()


def ml100k_log(path: Path) -> EventLog:
    genres = [line.split("|")[0] for _, line in _lines(path / "u.genre", "latin-1")]
    catalogue = ItemCatalogue()
    texts: dict[int, str] = {}
    for number, line in _lines(path / "u.item", "latin-1"):
        parts = line.split("|")
        if len(parts) != 5 + len(genres):
            raise DataError(f"{path / 'u.item'}:{number}: expected {5 + len(genres)} fields")
        movie_genres = [g for g, flag in zip(genres, parts[5:], strict=True) if flag == "1"]
        texts[catalogue.row(parts[0])] = f"{parts[1]}. {', '.join(movie_genres)}."
    events: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for number, line in _lines(path / "u.data"):
        parts = line.split("\t")
        row = catalogue.known(parts[1]) if len(parts) == 4 else None
        if row is None or not parts[3].isdigit():
            raise DataError(f"{path / 'u.data'}:{number}: expected 'user<TAB>known item<TAB>rating<TAB>unix time'")
        events[parts[0]].append((int(parts[3]) * 1000, number, row))
    return EventLog(path.name, catalogue.ids, _histories(events, "view"), [texts[i] for i in range(len(texts))], True)


def _histories(
    events: dict[str, list[tuple[int, int, int]]], default_type: str, types: dict[int, str] | None = None
) -> dict[str, History]:
    out = {}
    for user, rows in events.items():
        rows.sort()  # by time, then by position in the file
        out[user] = History(
            np.array([r[2] for r in rows], dtype=np.int64),
            [(types or {}).get(r[1], default_type) for r in rows],
            np.array([r[0] for r in rows], dtype=np.int64),
        )
    return out


def read_table(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV, JSONL or Parquet file as (line number, mapping)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), start=2)
    elif suffix in (".jsonl", ".ndjson"):
        for number, line in _lines(path):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield number, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several untyped errors for bad files
            raise DataError(f"{path}: unreadable Parquet ({exc})") from None
        yield from enumerate(table.to_pylist(), start=1)
    else:
        raise DataError(f"{path}: expected a .csv, .jsonl or .parquet file")


def _field(path: Path, number: int, row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None or str(value).strip() == "":
        raise DataError(f"{path}:{number}: missing {name}")
    return str(value).strip()


def _epoch_ms(path: Path, number: int, value: Any) -> int:
    try:
        ts = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{number}: ts {value!r} is not an epoch number") from None
    if not np.isfinite(ts) or ts < 0:
        raise DataError(f"{path}:{number}: ts {value!r} is out of range")
    return int(ts * 1000) if ts < SECONDS_VS_MS else int(ts)


def load_generic(path: Path, items: Path | None = None) -> Dataset:
    return generic_log(path, items).split()


def generic_log(path: Path, items: Path | None = None) -> EventLog:
    catalogue = ItemCatalogue()
    texts: dict[int, str] = {}
    if items is not None:
        for number, row in read_table(items):
            texts[catalogue.row(_field(items, number, row, "item_id"))] = _field(items, number, row, "text")
    events: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    types: dict[int, str] = {}
    timed = None
    for number, row in read_table(path):
        user, item = _field(path, number, row, "user_id"), _field(path, number, row, "item_id")
        has_ts = row.get("ts") not in (None, "")
        if timed is None:
            timed = has_ts
        elif timed != has_ts:
            raise DataError(f"{path}:{number}: ts must be given on every row or on none")
        if items is not None and catalogue.known(item) is None:
            raise DataError(f"{path}:{number}: item {item!r} is not in {items}")
        if row.get("type") not in (None, ""):
            types[number] = str(row["type"])
        events[user].append((_epoch_ms(path, number, row["ts"]) if has_ts else 0, number, catalogue.row(item)))
    if not events:
        raise DataError(f"{path}: no events")
    item_texts = [texts[i] for i in range(len(catalogue.ids))] if items is not None else None
    return EventLog(path.stem, catalogue.ids, _histories(events, ORDER_ONLY_TYPE, types), item_texts, bool(timed))
