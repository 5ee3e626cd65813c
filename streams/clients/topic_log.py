"""The pipeline's own topics as a training log: what `rtrec train --from-topics` learns from.

The catalogue topic gives the items and their text (the latest version of each; deleted
items are left out), the events topic the users' histories, in event time. Read as the
worker reads them: records that do not decode, events for items not in the catalogue and
repeated event ids are left out (and counted). A forgotten user's events up to the
forget command are left out too: a model must not learn what the stream has erased.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from encoder.data import EventLog, History
from streams.clients.kafka_io import end_offsets, read_until
from streams.errors import DataError, InvalidRecord
from streams.records import decode_control, decode_event
from streams.settings import Settings
from streams.worker.catalog_sync import catalogue_ends, read_catalog

PROGRESS_EVERY = 100_000


@dataclass
class TopicLog:
    log: EventLog
    counts: Counter[str] = field(default_factory=Counter)  # events kept, and those left out by reason


def read_topic_log(settings: Settings, progress: Callable[[str], None] = lambda _msg: None) -> TopicLog:
    limits = settings.limits()
    texts: dict[str, str] = {}
    for changes in read_catalog(settings, catalogue_ends(settings)):
        for change in changes:
            if change.item is None:
                texts.pop(change.item_id, None)
            else:
                texts[change.item_id] = change.item.text()
    if not texts:
        raise DataError(f"the catalogue topic {settings.items_topic!r} holds no items")
    row = {item_id: n for n, item_id in enumerate(texts)}
    forgotten = _forgotten(settings)
    counts: Counter[str] = Counter()
    events: dict[str, dict[str, tuple[int, str, int, str]]] = defaultdict(dict)  # user → event id → event
    read = 0
    for records in read_until(settings, settings.events_topic, end_offsets(settings, settings.events_topic)):
        for record in records:
            read += 1
            if read % PROGRESS_EVERY == 0:
                progress(f"  read {read:,} events from {settings.events_topic}")
            try:
                event = decode_event(record.value, record.key, limits)
            except InvalidRecord:
                counts["undecodable"] += 1
                continue
            if event.item_id not in row:
                counts["unknown item"] += 1
            elif event.ts <= forgotten.get(event.user_id, -1):
                counts["forgotten user"] += 1
            elif event.event_id in events[event.user_id]:
                counts["repeated event id"] += 1
            else:
                events[event.user_id][event.event_id] = (event.ts, event.event_id, row[event.item_id], event.type)
                counts["kept"] += 1
    if not counts["kept"]:
        raise DataError(f"the events topic {settings.events_topic!r} holds no event to learn from ({dict(counts)})")
    histories = {}
    for user, by_id in events.items():
        ordered = sorted(by_id.values())  # event time, then event id: the stream's window order
        histories[user] = History(
            np.array([e[2] for e in ordered], dtype=np.int64),
            [e[3] for e in ordered],
            np.array([e[0] for e in ordered], dtype=np.int64),
        )
    log = EventLog(f"topics {settings.events_topic}", list(texts), histories, list(texts.values()), has_time=True)
    return TopicLog(log, counts)


def _forgotten(settings: Settings) -> dict[str, int]:
    """Each forgotten user and the time of the last forget command for them."""
    limits = settings.limits()
    forgotten: dict[str, int] = {}
    for records in read_until(settings, settings.control_topic, end_offsets(settings, settings.control_topic)):
        for record in records:
            try:
                command = decode_control(record.value, record.key, limits)
            except InvalidRecord:
                continue
            forgotten[command.user_id] = max(command.ts, forgotten.get(command.user_id, command.ts))
    return forgotten
