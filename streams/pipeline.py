"""Micro-batch processing for both input topics: validate → apply → outputs.

Pure of Faust: the agents hand in raw messages and stored windows and get back
what to store and what to send. Anything invalid becomes a dead-letter record
naming its topic, partition, offset and the reason; valid messages around it
are processed as usual.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from streams.cooccurrence import PartitionedCooccurrence, pairs_with
from streams.errors import InvalidRecord
from streams.experiments.serving import CountsUpdate, RunningExperiment
from streams.item_vectors import ItemEmbedder, ItemVectorCache, ItemVectors
from streams.metrics import WorkerMetrics
from streams.ports import ItemEncoderRuntime, TextEmbedder, VectorPoint, VectorStore
from streams.recommend import Recommender, RefreshRequest, now_ms
from streams.records import (
    ControlCommand,
    DeadLetter,
    Event,
    Item,
    Limits,
    Recommendation,
    decode_control,
    decode_event,
    decode_item,
)
from streams.settings import Settings
from streams.state import AddOutcome, Together, UserWindow
from streams.trending import PartitionedTrending

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncomingMessage:
    """A consumed record as the batch logic sees it: raw bytes and where they came from."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_s: float | None = None  # the record's Kafka timestamp (how fresh a list is, is measured from it)


@dataclass(frozen=True)
class WindowLimits:
    """The bounds of every user window (count, event-time horizon, remembered event ids)."""

    max_events: int
    horizon_ms: int
    dedup_capacity: int

    @classmethod
    def of(cls, settings: Settings) -> WindowLimits:
        return cls(settings.window_size, settings.window_horizon_s * 1000, settings.dedup_capacity)

    def new_window(self) -> UserWindow:
        return UserWindow(self.max_events, self.horizon_ms, self.dedup_capacity)

    def load(self, raw: bytes | None) -> UserWindow:
        if raw is None:
            return self.new_window()
        return UserWindow.from_bytes(raw, self.max_events, self.horizon_ms, self.dedup_capacity)


def dead_letter(
    message: IncomingMessage, error: InvalidRecord, clock: Callable[[], int], copy_limit: int
) -> DeadLetter:
    """The dead letter of ``message``, with a copy of its key and value when they fit in ``copy_limit`` bytes.

    An original close to the broker's size limit would not fit again inside a dead letter, and the broker
    would refuse it: such an original stays readable at its topic, partition and offset instead.
    """
    key, value, reason = message.key, message.value, error.reason
    size = len(key or b"") + len(value or b"")
    if size > copy_limit:
        key, value = None, None
        reason += f" (the original's {size:,} bytes are not copied: read them at its offset)"
    return DeadLetter(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        error=reason,
        key=key,
        value=value,
        ts=clock(),
    )


def _partitions_of(messages: Sequence[IncomingMessage]) -> dict[str, int]:
    """The partition of each user's messages in a batch (keyed by user id, as both input topics are)."""
    partitions = {}
    for message in messages:
        if message.key is not None:
            try:
                partitions[message.key.decode("utf-8")] = message.partition
            except UnicodeDecodeError:
                continue  # dead-lettered
    return partitions


def _by_partition(events: Sequence[Event], partition_of: Mapping[str, int]) -> dict[int, list[Event]]:
    """Events grouped by the partition their user's messages came from (a user's are all on one)."""
    grouped: dict[int, list[Event]] = {}
    for event in events:
        grouped.setdefault(partition_of[event.user_id], []).append(event)
    return grouped


def _reject(
    letters: list[DeadLetter],
    message: IncomingMessage,
    error: InvalidRecord,
    kind: str,
    metrics: WorkerMetrics,
    clock: Callable[[], int],
    limits: Limits,
) -> None:
    letters.append(dead_letter(message, error, clock, limits.max_message_bytes))
    metrics.dead_letters.labels(kind, error.field or "record").inc()


def _kept_together(user_id: str, window: UserWindow, trigger: Event) -> Together | None:
    """The co-occurrence candidates a replayed trigger's list was first ranked with, if the window kept them."""
    try:
        return window.together_for(trigger.event_id)
    except InvalidRecord as exc:
        # The list is ranked with the counts as they are now, as for a trigger whose candidates were not kept.
        log.error("stored co-occurrence candidates of user %r are unreadable (%s)", user_id, exc.reason)
        return None


@dataclass
class EventBatchOutcome:
    """What an events micro-batch leaves to the agent: windows to store, lists and dead letters to send."""

    windows: dict[str, bytes] = field(default_factory=dict)  # what to store, per touched user
    recommendations: list[Recommendation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    experiment_counts: list[CountsUpdate] = field(default_factory=list)  # changes to a running experiment's counts


class EventBatchProcessor:
    """validate → drop unknown items → dedup and window update → one refresh per touched user.

    Control commands arrive in the same micro-batches (the control topic is keyed and
    partitioned like the events), so no lock is needed. A forget-user erases the user's events up
    to the command's time, stored or in the batch, and deletes their vector; the window keeps a
    marker of that time, so that erased events replayed later stay out (``UserWindow.forget``).
    Events after that time are kept, whichever topic was read first.
    """

    def __init__(
        self,
        recommender: Recommender,
        windows: WindowLimits,
        limits: Limits,
        clock: Callable[[], int] = now_ms,
        metrics: WorkerMetrics | None = None,
        restored_capacity: int = 10_000,
        control_topic: str = "rec.control",
        trending: PartitionedTrending | None = None,
        cooccurrence: PartitionedCooccurrence | None = None,
    ) -> None:
        self.recommender = recommender
        self.cooccurrence = cooccurrence  # counted from the events new to windows; None: not counted
        self.control_topic = control_topic
        self.trending = trending or PartitionedTrending()
        self.window_limits = windows
        self.limits = limits
        self.clock = clock
        self.metrics = metrics or recommender.metrics
        # Windows as restored objects, next to the stored bytes they were made from. A hit needs the
        # table to still hold exactly those bytes, so a window another worker wrote (after a
        # rebalance) is never served stale; restoring one costs ~90 µs, a hit nothing.
        self._restored: OrderedDict[str, tuple[bytes, UserWindow]] = OrderedDict()
        self.restored_capacity = restored_capacity
        # The experiment serving the lists, if one runs; replaced between micro-batches on the events thread.
        self.experiment: RunningExperiment | None = None

    def users_in(self, messages: Sequence[IncomingMessage]) -> set[str]:
        """The users whose stored windows ``process`` will need (keys that decode as UTF-8)."""
        return set(_partitions_of(messages))

    def process(
        self,
        messages: Sequence[IncomingMessage],
        stored: Mapping[str, bytes | None],
        committed: Mapping[int, int] | None = None,
    ) -> EventBatchOutcome:
        """``committed``: each events partition's committed offset where known, so that windows let go of
        the co-occurrence candidates no replay can ask for any more."""
        outcome = EventBatchOutcome()
        stage = self.metrics.stage
        experiment = self.experiment  # one for the whole batch
        tally: Counter[AddOutcome] = Counter()
        with stage("decode"):
            valid, forgotten = self._decode(messages, outcome, tally)
        self.recommender.forget(sorted(forgotten))
        partition_of = _partitions_of(messages)
        with stage("state"):
            windows = {
                user: self._load(user, stored.get(user)) for user in {e.user_id for _, e in valid} | {*forgotten}
            }
            for user, until in forgotten.items():
                if experiment is not None:
                    outcome.experiment_counts += experiment.forget(windows[user], user, until, partition_of[user])
                windows[user].forget(until)
        with stage("lookup"):
            # One fetch for the new events' items and everything already in the windows.
            needed = {event.item_id for _, event in valid} | {e.item_id for w in windows.values() for e in w.entries}
            vectors = self.recommender.item_vectors(list(needed))
        by_user = self._by_known_user(valid, vectors, outcome)
        with stage("state"):
            offsets = {event.event_id: message.offset for message, event in valid}
            requests, fresh = self._add_to_windows(by_user, windows, tally, partition_of, offsets)
        with stage("lookup"):
            # A replay's window may hold entries evicted since, whose vectors the fetch above left out.
            then_items = {e.item_id for r in requests if r.replayed for e in r.window.entries} - vectors.keys()
            if then_items:
                vectors = vectors.merged(self.recommender.item_vectors(list(then_items)))
        self.trending.add(_by_partition(fresh, partition_of))
        if experiment is None:
            outcome.recommendations = self.recommender.refresh_batch(requests, vectors)
        else:
            outcome.recommendations = experiment.lists(requests, vectors)
            with stage("state"):
                replayed = {r.user_id for r in requests if r.replayed}
                credited = experiment.attribute(windows, fresh, outcome.recommendations, replayed, partition_of)
                outcome.experiment_counts += credited
        with stage("state"):
            # Stored once the batch is done with them (an experiment keeps its part inside them); a forgotten
            # user's window keeps the marker, also where no event of theirs was kept.
            committed_of = committed or {}
            for user_id in {r.user_id for r in requests} | forgotten.keys():
                windows[user_id].release_together(committed_of.get(partition_of[user_id]))
                stored_now = windows[user_id].to_bytes()
                outcome.windows[user_id] = stored_now
                self._keep(user_id, stored_now, windows[user_id])
        outcome.counts = {
            "events": len(messages),
            "added": tally[AddOutcome.ADDED],
            "duplicates": tally[AddOutcome.DUPLICATE],
            "too_old": tally[AddOutcome.TOO_OLD],
            "dead_lettered": len(outcome.dead_letters),
            "recommendations": len(outcome.recommendations),
            "forgotten_users": len(forgotten),
            "erased": tally[AddOutcome.FORGOTTEN],
        }
        self._count(outcome.counts)
        return outcome

    def _decode(
        self, messages: Sequence[IncomingMessage], outcome: EventBatchOutcome, tally: Counter[AddOutcome]
    ) -> tuple[list[tuple[IncomingMessage, Event]], dict[str, int]]:
        """The batch's valid events, with control commands applied to them, and each forgotten user's
        erasure time; what does not decode is dead-lettered."""
        now = self.clock()
        valid: list[tuple[IncomingMessage, Event]] = []
        forgotten: dict[str, int] = {}  # user → the time up to which their events are erased
        for message in messages:
            try:
                if message.topic == self.control_topic:
                    command = decode_control(message.value, message.key, self.limits)
                    tally[AddOutcome.FORGOTTEN] += self._apply(command, valid, forgotten)
                else:
                    valid.append((message, decode_event(message.value, message.key, self.limits, now_ms=now)))
            except InvalidRecord as exc:
                kind = "control" if message.topic == self.control_topic else "events"
                _reject(outcome.dead_letters, message, exc, kind, self.metrics, self.clock, self.limits)
        return valid, forgotten

    def _by_known_user(
        self, valid: list[tuple[IncomingMessage, Event]], vectors: ItemVectors, outcome: EventBatchOutcome
    ) -> dict[str, list[Event]]:
        """The events of items in the catalogue, by user; the others are dead-lettered."""
        by_user: dict[str, list[Event]] = {}
        for message, event in valid:
            if event.item_id not in vectors:
                unknown = InvalidRecord(f"unknown item {event.item_id[:64]!r}", "item_id")
                _reject(outcome.dead_letters, message, unknown, "events", self.metrics, self.clock, self.limits)
                continue
            by_user.setdefault(event.user_id, []).append(event)
        return by_user

    def _add_to_windows(
        self,
        by_user: Mapping[str, list[Event]],
        windows: Mapping[str, UserWindow],
        tally: Counter[AddOutcome],
        partition_of: Mapping[str, int],
        offsets: Mapping[str, int],
    ) -> tuple[list[RefreshRequest], list[Event]]:
        """Each user's events into their window: one refresh per user with a kept event (their window is
        stored), and the events new to their windows (what trending and co-occurrence count)."""
        requests = []
        fresh: list[Event] = []
        for user_id, events in by_user.items():
            window = windows[user_id]
            results = [self._add(window, event, partition_of[user_id]) for event in events]
            tally.update(results)
            fresh += [e for e, r in zip(events, results, strict=True) if r is AddOutcome.ADDED]
            kept = [(e, r) for e, r in zip(events, results, strict=True) if r is not AddOutcome.FORGOTTEN]
            if not kept:
                continue  # all of them erased: nothing to store or answer
            # Redelivered events only (a replay after a crash): answer from the window they first met,
            # so that a (user, trigger) pair gets the list it got before, not one of a later window.
            # Otherwise the trigger is the last event new to the window, a pair not answered before.
            new = [e for e, r in kept if r is not AddOutcome.DUPLICATE]
            then = None if new else window.as_of(kept[-1][0].event_id)
            ids = tuple(e.event_id for e, _ in kept)
            trigger = new[-1] if new else kept[-1][0]
            served = window if then is None else then
            together = _kept_together(user_id, window, trigger) if then is not None else None
            requests.append(
                RefreshRequest(user_id, served, trigger, ids, then is not None, together, offsets[trigger.event_id])
            )
        return requests, fresh

    def _add(self, window: UserWindow, event: Event, partition: int) -> AddOutcome:
        result = window.add(event)
        if result is AddOutcome.ADDED and self.cooccurrence is not None:
            before = pairs_with(window, event, self.cooccurrence.spec.span)
            if before is not None:
                self.cooccurrence.observe(partition, before, event.item_id, event.ts)
        return result

    def _apply(
        self, command: ControlCommand, earlier: list[tuple[IncomingMessage, Event]], forgotten: dict[str, int]
    ) -> int:
        """Apply a control command to the batch so far; how many of its events it erased (those after
        it in the batch are erased when they meet the window)."""
        # forget_user is the only command (decode_control refuses others).
        user = command.user_id
        forgotten[user] = max(forgotten.get(user, command.ts), command.ts)
        kept = [(m, e) for m, e in earlier if e.user_id != user or e.ts > command.ts]
        erased = len(earlier) - len(kept)
        earlier[:] = kept
        # The id stays out of the log: a record of whom was forgotten would defeat the forgetting.
        log.info("forgot a user (%d events of this batch erased with the stored window)", erased)
        return erased

    def _count(self, counts: Mapping[str, int]) -> None:
        self.metrics.batch_events.observe(counts["events"])
        self.metrics.forgotten_users.inc(counts["forgotten_users"])
        for outcome in ("added", "duplicates", "too_old", "dead_lettered", "erased"):
            self.metrics.events.labels(outcome.removesuffix("s")).inc(counts[outcome])
        self.metrics.recommendations.inc(counts["recommendations"])

    def _load(self, user_id: str, raw: bytes | None) -> UserWindow:
        # Taken out of the cache: if this batch fails half-way, no half-updated window is kept.
        kept = self._restored.pop(user_id, None)
        if kept is not None and raw is not None and kept[0] == raw:
            return kept[1]
        try:
            return self.window_limits.load(raw)
        except InvalidRecord as exc:
            # A corrupt stored window must not wedge the user's partition: start afresh, loudly.
            log.error("stored window of user %r is unreadable (%s); starting a new window", user_id, exc.reason)
            return self.window_limits.new_window()

    def _keep(self, user_id: str, stored: bytes, window: UserWindow) -> None:
        self._restored[user_id] = (stored, window)
        if len(self._restored) > self.restored_capacity:
            self._restored.popitem(last=False)


@dataclass
class CatalogBatchOutcome:
    """What a catalogue micro-batch did, and the dead letters it leaves to the agent to send."""

    upserted: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


@dataclass
class ItemTarget:
    """Where one item tower's vectors go: its collection, and the cache the event path reads them through."""

    embedder: ItemEmbedder
    collection: str
    cache: ItemVectorCache | None = None


@dataclass
class Migration:
    """A collection being filled for an item tower (a model swap's next one, an experiment variant's) while
    the catalogue agent keeps writing changes to it."""

    target: ItemTarget
    ends: dict[int, int]  # catalogue end offsets when the fill began: it reads up to these
    settled: set[str] = field(default_factory=set)  # items written here from past those ends: the fill skips them


class CatalogBatchProcessor:
    """Item upserts are embedded (text, then the item tower) and written in one batch;
    a tombstone (null value) deletes. Every change is written for the towers of experiment variants
    too, and for a tower being filled (``begin_migration`` … ``finish_migration`` or ``keep_for_variant``)."""

    def __init__(
        self,
        embedder: TextEmbedder,
        item_encoder: ItemEncoderRuntime,
        store: VectorStore,
        *,
        items_collection: str,
        limits: Limits,
        item_cache: ItemVectorCache | None = None,
        clock: Callable[[], int] = now_ms,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.metrics = metrics or WorkerMetrics()
        self.store = store
        # The served tower: what the catalogue's records are checked against, and kept in step with its cache.
        self.current = ItemTarget(ItemEmbedder(embedder, item_encoder), items_collection, item_cache)
        self.fills: list[Migration] = []  # towers being filled from the catalogue topic
        self.variant_targets: list[ItemTarget] = []  # towers of an experiment's variant models, kept in step too
        self.limits = limits
        self.clock = clock

    @property
    def items_collection(self) -> str:
        return self.current.collection

    def process(self, messages: Sequence[IncomingMessage]) -> CatalogBatchOutcome:
        outcome = CatalogBatchOutcome()
        latest: dict[str, tuple[IncomingMessage, Item | None]] = {}  # the last change to each item in this batch wins
        for message in messages:
            try:
                if message.value is None:
                    latest[self._tombstone_id(message.key)] = (message, None)
                else:
                    item = decode_item(message.value, message.key, self.limits)
                    if not self.current.embedder.can_place(item):
                        raise InvalidRecord("the loaded model reads no text and never learned this item_id")
                    latest[item.item_id] = (message, item)
            except InvalidRecord as exc:
                _reject(outcome.dead_letters, message, exc, "items", self.metrics, self.clock, self.limits)
        upserts = [item for _, item in latest.values() if item is not None]
        outcome.deleted = [item_id for item_id, (_, item) in latest.items() if item is None]
        outcome.upserted = [item.item_id for item in upserts]
        for targets in self._by_collection():
            self._write(targets, upserts, outcome.deleted)
        for fill in self.fills:
            fill.settled.update(
                item_id for item_id, (m, _) in latest.items() if m.offset >= fill.ends.get(m.partition, 0)
            )
        for name, changes in (("upserted", outcome.upserted), ("deleted", outcome.deleted)):
            self.metrics.catalog.labels(name).inc(len(changes))
        self.metrics.catalog.labels("dead_lettered").inc(len(outcome.dead_letters))
        return outcome

    def begin_migration(self, target: ItemTarget, ends: Callable[[], dict[int, int]]) -> Migration:
        """From now on changes are written for ``target`` too; the fill, with the end offsets it must read up to.

        ``ends`` is read here, between batches: every change this processor writes later either comes
        before those offsets (the fill writes it as well, in order) or at or past them (settled).
        """
        fill = Migration(target, ends())
        self.fills.append(fill)
        return fill

    def backfill(self, fill: Migration, changes: Mapping[str, VectorPoint | None]) -> None:
        """Write a chunk of the fill (the newest change per item: its point, or None for a deletion)
        except the settled items."""
        fresh = {i: point for i, point in changes.items() if i not in fill.settled}
        points = [point for point in fresh.values() if point is not None]
        deleted = [i for i, point in fresh.items() if point is None]
        self.store.upsert(fill.target.collection, points)
        self.store.delete(fill.target.collection, deleted)

    def finish_migration(self, fill: Migration) -> ItemTarget:
        """The filled tower becomes the served one; the target it replaces is returned."""
        self.fills.remove(fill)
        replaced, self.current = self.current, fill.target
        return replaced

    def keep_for_variant(self, fill: Migration) -> None:
        """The filled tower serves an experiment variant: kept in step from now on."""
        self.fills.remove(fill)
        self.variant_targets.append(fill.target)

    def abandon_migration(self, fill: Migration) -> None:
        self.fills.remove(fill)

    def collections_in_use(self) -> set[str]:
        """The collections the catalogue keeps in step (none of them may be dropped)."""
        return {self.current.collection, *(t.collection for t in self.variant_targets)}

    def _by_collection(self) -> list[list[ItemTarget]]:
        """Every target, grouped by collection: a collection several targets share (a variant model with the
        served tower, a swap to a variant's tower) is embedded and written once, and each cache kept in step."""
        groups: dict[str, list[ItemTarget]] = {}
        for target in [self.current, *self.variant_targets, *(f.target for f in self.fills)]:
            group = groups.setdefault(target.collection, [])
            if all(target is not held for held in group):
                group.append(target)
        return list(groups.values())

    def set_variant_targets(self, targets: Sequence[ItemTarget]) -> None:
        """The variant towers kept in step from now on (an experiment changed)."""
        self.variant_targets = list(targets)

    def _write(self, targets: Sequence[ItemTarget], upserts: Sequence[Item], deleted: Sequence[str]) -> None:
        first = targets[0]
        points = first.embedder.points(upserts)
        if points:
            self.store.upsert(first.collection, points)
        self.store.delete(first.collection, deleted)
        for target in targets:
            if target.cache is not None:
                if points:
                    target.cache.put({p.id: p.vector for p in points})
                target.cache.discard(deleted)

    def _tombstone_id(self, key: bytes | None) -> str:
        if not key:
            raise InvalidRecord("a tombstone (null value) needs the item_id as its key")
        try:
            item_id = key.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRecord("tombstone key is not UTF-8") from None
        if len(item_id) > self.limits.max_id_chars:
            raise InvalidRecord(f"tombstone key of {len(item_id)} characters exceeds the limit")
        return item_id
