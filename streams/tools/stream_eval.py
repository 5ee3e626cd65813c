"""`rtrec stream-eval`: prequential evaluation of the live stream, next to the same model offline.

A timestamped log (MovieLens 100K, or any generic file with times) is cut in event
time. The model is trained on the events before the cut (or a given bundle is
used); those events are replayed first, as fast as possible, to fill the windows.
The events after the cut are then replayed at a chosen rate through the real
broker and worker, and each is scored against what the user was holding just
before it was sent: the newest recommendation for that user that had *arrived*
on the output topic by then (none yet: a miss). That is prequential evaluation:
every event tests the list the stream had already served. By default a user's
next event waits for the answer to their previous one (``Replay``), as a live
user's seconds between events let it; ``--no-wait`` sends in strict time order.

Scored by the same code on the same events:

- stream: the list held, as above;
- offline: the same exported model, fed the same window the worker held (the
  stream's own ``UserWindow``), ranking the whole catalogue exactly, window items
  left out, as the stream leaves them out; fused with co-occurrence counted from
  the same windows where the bundle says so (and then the encoder alone too);
- popularity stream: the items with the most events so far, window items left out.

The ratio stream/offline shows what the live path loses (stale lists while
events outrun the worker, approximate search, anything lost or reordered);
``fresh`` is the share of scored events whose held list already accounted for
the user's previous event. Events of users with no earlier event are not scored.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.data import EventLog, History, LoggedEvent
from infra.kafka_local import local_broker_for
from infra.topics import ensure_pipeline_topics
from streams.clients.helpers import Publisher, RecommendationReader
from streams.cooccurrence import Cooccurrence, pairs_with
from streams.errors import RtrecError
from streams.pipeline import WindowLimits
from streams.recommend import now_ms
from streams.records import Event, Item
from streams.settings import Settings
from streams.state import AddOutcome, UserWindow
from streams.tools.worker_runner import WorkerProcess

K = 10
TIME_BUCKETS = 10
OFFLINE_BATCH = 512
ANSWER_TIMEOUT_S = 10.0  # a user whose answer takes longer goes on (the list they then hold is stale)


@dataclass(frozen=True)
class StreamEvalOptions:
    train_fraction: float = 0.8  # events before this quantile of event time train the model and warm the windows
    rate: float = 200.0  # events/s of the scored replay (0: as fast as the producer sends)
    wait_for_answers: bool = True  # a user's next event waits for the answer to their previous one (Replay)
    model_dir: Path | None = None  # a folder with both bundles, used instead of training on the log
    encoder_overrides: dict[str, object] = field(default_factory=dict)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0:
            raise RtrecError(f"stream-eval: --train-fraction must be in (0, 1), got {self.train_fraction}")
        if self.rate < 0:
            raise RtrecError(f"stream-eval: --rate must be >= 0, got {self.rate}")


@dataclass(frozen=True)
class HeldList:
    arrived_ms: int
    items: tuple[str, ...]
    event_ids: frozenset[str]


@dataclass
class ScoredEvent:
    event: LoggedEvent
    position: int  # in the replay
    event_id: str
    previous_id: str  # the user's event before this one
    sent_ms: int = 0  # when it was handed to the producer


@dataclass
class StreamEvalResult:
    metrics: dict[str, dict[str, float]]  # method → hr@10, ndcg@10
    ratio: dict[str, float]  # stream/offline per metric
    fresh: float
    scored: int
    replayed: int
    buckets: list[dict[str, float]]  # per event-time bucket: start_ms and each method's hr@10
    cut_ms: int
    model: str
    seconds: float


class HeldLists:
    """Every recommendation per user with its arrival time, read from the output topic in a thread."""

    def __init__(self, settings: Settings) -> None:
        self._reader = RecommendationReader(settings, from_beginning=True)  # the run's own, fresh topic
        self._lists: dict[str, list[HeldList]] = {}
        self._accounted: set[str] = set()  # every event id some arrived recommendation accounts for
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rtrec-stream-eval-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            records = self._reader.poll(0.1)
            arrived = now_ms()
            with self._lock:
                for rec in records:
                    held = HeldList(arrived, tuple(i.item_id for i in rec.items), frozenset(rec.event_ids))
                    self._lists.setdefault(rec.user_id, []).append(held)
                    self._accounted.update(rec.event_ids)
        self._reader.close()

    def held_before(self, user: str, ms: int) -> HeldList | None:
        """The newest list of ``user`` that had arrived by ``ms`` (a user's lists are kept in arrival order)."""
        with self._lock:
            lists = self._lists.get(user, [])
            arrived = bisect.bisect_right(lists, ms, key=lambda held: held.arrived_ms)
            return lists[arrived - 1] if arrived else None

    def answered(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._accounted

    def unanswered(self, event_ids: set[str]) -> int:
        with self._lock:
            return len(event_ids - self._accounted)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def catalogue_items(log: EventLog) -> list[Item]:
    """The log's catalogue as items: the text the model was trained on is the title (it is all that is read)."""
    first_ms = int(min(h.ts_ms[0] for h in log.histories.values()))
    texts = log.item_texts or log.item_ids
    return [Item(item_id, title=text, ts=first_ms) for item_id, text in zip(log.item_ids, texts, strict=True)]


def offline_lists(
    bundle: Path,
    models: Path,
    log: EventLog,
    events: Sequence[LoggedEvent],
    event_ids: Sequence[str],
    scored: set[int],
    windows: WindowLimits,
    progress: Callable[[str], None],
) -> dict[str, dict[int, np.ndarray]]:
    """Per method, per scored event (by position in ``events``): the method's top K, as catalogue rows.
    The methods: the served model ("offline": fused with co-occurrence where the bundle says so, and then
    also the encoder alone) and popularity.

    Each sees only what came before the event; each window is rebuilt by the stream's own ``UserWindow``
    from the same event ids, so it equals the one the worker held, and co-occurrence is counted from the
    same windows as the worker counts it.
    """
    from encoder.build import ensure_text_encoder
    from encoder.evaluate import BundleScorer
    from encoder.fusion import cooccurrence_scores
    from encoder.ranking_metrics import top_k
    from encoder.runtime import OnnxTextEmbedder

    embedder = OnnxTextEmbedder(ensure_text_encoder(models), provider="cpu") if log.item_texts else None
    scorer = BundleScorer(bundle, log.split(), embedder)
    fusion = scorer.users.fusion
    together = Cooccurrence(fusion.cooccurrence) if fusion.active else None
    counts = np.zeros(len(log.item_ids), dtype=np.float64)
    user_windows: dict[str, UserWindow] = {}
    row_of = {item_id: row for row, item_id in enumerate(log.item_ids)}
    pending: list[tuple[int, History]] = []
    pending_together: list[np.ndarray] = []  # co-occurrence's scores of each pending history at its event's time
    lists: dict[str, dict[int, np.ndarray]] = {
        "offline": {},
        **({"offline encoder alone": {}} if together is not None else {}),
    }
    lists["popularity stream"] = {}

    def rank_pending() -> None:
        histories = [h for _, h in pending]
        exclude = [h.items for h in histories]
        alone = scorer.scores(histories)
        ranked = {"offline": alone}
        if together is not None:
            ranked = {"offline": fusion.fused(alone, np.stack(pending_together)), "offline encoder alone": alone}
        for method, scores in ranked.items():
            tops = top_k(scores, exclude, K)
            lists[method].update((position, top) for (position, _), top in zip(pending, tops, strict=True))
        pending.clear()
        pending_together.clear()

    for position, event in enumerate(events):
        window = user_windows.setdefault(event.user, windows.new_window())
        if position in scored:
            entries = window.entries
            history = History(
                np.array([row_of[e.item_id] for e in entries], dtype=np.int64),
                [e.type for e in entries],
                np.array([e.ts for e in entries], dtype=np.int64),
            )
            pending.append((position, history))
            if together is not None:
                pending_together.append(cooccurrence_scores(together, [history], log.item_ids, fusion)[0])
            lists["popularity stream"][position] = top_k(counts[None, :], [history.items], K)[0]
            if len(pending) == OFFLINE_BATCH:
                rank_pending()
        added = Event(event_ids[position], event.user, log.item_ids[event.item], event.type, event.ts_ms)
        if window.add(added) is AddOutcome.ADDED and together is not None:
            before = pairs_with(window, added, fusion.cooccurrence.span)
            if before is not None:
                together.observe(before, added.item_id, added.ts)
        counts[event.item] += 1
        if position and position % 20_000 == 0:
            progress(f"  offline: {position:,}/{len(events):,} events")
    if pending:
        rank_pending()
    return lists


def run_stream_eval(
    settings: Settings, log: EventLog, options: StreamEvalOptions, say: Callable[[str], None] = print
) -> StreamEvalResult:
    with local_broker_for(settings, say):
        return _run(settings, log, options, say)


def _run(settings: Settings, log: EventLog, options: StreamEvalOptions, say: Callable[[str], None]) -> StreamEvalResult:
    from encoder.build import ensure_log_encoder
    from encoder.config import INTEREST_BUNDLE, BundleManifest

    started = time.perf_counter()
    cut = log.time_quantile(options.train_fraction)
    if options.model_dir is not None:
        models = options.model_dir
    else:
        models = settings.home / "stream-eval-models" / "".join(c if c.isalnum() else "-" for c in log.name)
        say(f"training on the {options.train_fraction:.0%} of events before {_date(cut)}…")
        ensure_log_encoder(models, log.before(cut), dict(options.encoder_overrides), say)
    bundle = models / INTEREST_BUNDLE
    version = BundleManifest.read(bundle, "interest-encoder").version
    run = uuid.uuid4().hex[:8]
    run_dir = settings.home / "stream-eval" / run
    live = settings.isolated(f"stream-eval-{run}").with_overrides(
        model_dir=str(models), home=run_dir, qdrant_path=str(run_dir / "qdrant")
    )
    events = log.events()
    event_ids = [f"{run}-{position:09d}" for position in range(len(events))]  # ties in time keep replay order
    warm = int(np.searchsorted([e.ts_ms for e in events], cut, side="left"))
    scored = _scored(events, event_ids, warm)
    if not scored:
        raise RtrecError("stream-eval: no event after the cut has an earlier event of its user to be scored")
    for topic, what in ensure_pipeline_topics(live).items():
        say(f"topic {topic}: {what}")
    worker = WorkerProcess(live, run_dir / "worker.log")
    held: HeldLists | None = None
    try:
        worker.wait_ready(options.timeout_s)
        with Publisher(live) as publisher:
            for item in catalogue_items(log):
                publisher.publish_item(item)
            publisher.flush()
            say(f"published {len(log.item_ids):,} items; waiting for the worker to embed them…")
            worker.wait_caught_up(live.items_topic, options.timeout_s)
            held = HeldLists(live)
            say(f"warm-up: {warm:,} events before {_date(cut)}, as fast as they can be sent…")
            for position in range(warm):
                publisher.publish_event(_event(events[position], event_ids[position], log))
            publisher.flush()
            worker.wait_caught_up(live.events_topic, options.timeout_s)
            pace = f"{options.rate:g} events/s" if options.rate else "full speed"
            say(f"replaying {len(events) - warm:,} events at {pace} ({len(scored):,} scored)…")
            sent = Replay(publisher, held, events, event_ids, log).run(
                warm, options.rate, options.wait_for_answers, say
            )
        worker.wait_caught_up(live.events_topic, options.timeout_s)
        _wait_accounted(held, set(event_ids), options.timeout_s)
    finally:
        if held is not None:
            held.close()
        worker.stop()
    for s in scored:
        s.sent_ms = sent[s.position]
    say("ranking the same events offline…")
    windows = WindowLimits.of(live)
    offline = offline_lists(bundle, models, log, events, event_ids, {s.position for s in scored}, windows, say)
    return _score(scored, held, log, offline, cut, version, len(events), time.perf_counter() - started)


def _date(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def _event(event: LoggedEvent, event_id: str, log: EventLog) -> Event:
    return Publisher.event(event.user, log.item_ids[event.item], event.type, ts=event.ts_ms, event_id=event_id)


def _scored(events: Sequence[LoggedEvent], event_ids: Sequence[str], warm: int) -> list[ScoredEvent]:
    """The events after the cut whose user had an event before (each with that event's id)."""
    previous: dict[str, str] = {}
    scored = []
    for position, event in enumerate(events):
        if position >= warm and event.user in previous:
            scored.append(ScoredEvent(event, position, event_ids[position], previous[event.user]))
        previous[event.user] = event_ids[position]
    return scored


class Replay:
    """Sends the scored part of the log at a rate, optionally waiting for each user's answers.

    With ``wait_for_answers``, a user's next event is held back until the recommendation
    for their previous one has arrived (other users' events go ahead meanwhile), as live,
    where a user's seconds between events dwarf the pipeline's latency. Without it, events
    go strictly in event-time order, and a replay that squeezes months into minutes sends
    one user's session faster than any pipeline answers: the lists held are then stale.
    """

    def __init__(
        self,
        publisher: Publisher,
        held: HeldLists,
        events: Sequence[LoggedEvent],
        event_ids: Sequence[str],
        log: EventLog,
    ) -> None:
        self.publisher = publisher
        self.held = held
        self.events = events
        self.event_ids = event_ids
        self.log = log
        self.awaiting: dict[str, tuple[str, float]] = {}  # user → (their event in flight, when it was sent)
        self.pending: dict[str, deque[int]] = {}  # user → their events held back, in order
        self.upcoming = 0

    def run(self, first: int, rate: float, wait_for_answers: bool, say: Callable[[str], None]) -> dict[int, int]:
        """Send ``events[first:]``; when each was handed to the producer (epoch ms), by position."""
        sent: dict[int, int] = {}
        self.upcoming = first
        total = len(self.events) - first
        start = time.monotonic()
        while len(sent) < total:
            self._release()
            position = self._next(wait_for_answers)
            if position is None:
                time.sleep(0.002)
                continue
            if rate:
                delay = start + len(sent) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            event = self.events[position]
            sent[position] = now_ms()
            self.publisher.publish_event(_event(event, self.event_ids[position], self.log))
            if wait_for_answers:
                self.publisher.flush()  # an event waiting in the producer's buffer cannot be answered
                self.awaiting[event.user] = (self.event_ids[position], time.monotonic())
            if len(sent) % max(total // 10, 1) == 0:
                say(f"  replayed {len(sent):,}/{total:,}")
        self.publisher.flush()
        return sent

    def _release(self) -> None:
        """Users whose event in flight was answered (or waited on too long) may send their next."""
        now = time.monotonic()
        for user, (event_id, since) in list(self.awaiting.items()):
            if self.held.answered(event_id) or now - since > ANSWER_TIMEOUT_S:
                del self.awaiting[user]

    def _next(self, wait_for_answers: bool) -> int | None:
        if not wait_for_answers:
            self.upcoming += 1
            return self.upcoming - 1
        for user, queued in self.pending.items():
            if user not in self.awaiting:
                position = queued.popleft()
                if not queued:
                    del self.pending[user]
                return position
        while self.upcoming < len(self.events):
            position, self.upcoming = self.upcoming, self.upcoming + 1
            user = self.events[position].user
            if user not in self.awaiting and user not in self.pending:
                return position
            self.pending.setdefault(user, deque()).append(position)
        return None


def _wait_accounted(held: HeldLists, event_ids: set[str], timeout_s: float) -> None:
    """Until every replayed event is in some recommendation that arrived (it is scored either way)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not held.unanswered(event_ids):
            return
        time.sleep(0.5)
    missing = held.unanswered(event_ids)
    raise RtrecError(f"stream-eval: {missing:,} replayed events never showed up in a recommendation")


def _score(
    scored: Sequence[ScoredEvent],
    held: HeldLists,
    log: EventLog,
    offline: dict[str, dict[int, np.ndarray]],
    cut: int,
    version: str,
    replayed: int,
    seconds: float,
) -> StreamEvalResult:
    methods = ("stream", *offline)
    gains = {method: np.zeros(len(scored)) for method in methods}
    fresh = 0
    for n, s in enumerate(scored):
        target = log.item_ids[s.event.item]
        held_list = held.held_before(s.event.user, s.sent_ms)
        fresh += held_list is not None and s.previous_id in held_list.event_ids
        lists: dict[str, Sequence[str]] = {"stream": held_list.items if held_list else ()}
        lists |= {method: [log.item_ids[row] for row in tops[s.position]] for method, tops in offline.items()}
        for method, items in lists.items():
            if target in items[:K]:
                gains[method][n] = 1.0 / np.log2(list(items).index(target) + 2)
    metrics = {method: {"hr@10": float(np.mean(g > 0)), "ndcg@10": float(np.mean(g))} for method, g in gains.items()}
    ratio = {
        name: metrics["stream"][name] / metrics["offline"][name] if metrics["offline"][name] else float("nan")
        for name in ("hr@10", "ndcg@10")
    }
    buckets = []
    for part in np.array_split(np.arange(len(scored)), min(TIME_BUCKETS, len(scored))):
        row = {"start_ms": float(scored[int(part[0])].event.ts_ms), "events": float(len(part))}
        row.update({method: float(np.mean(gains[method][part] > 0)) for method in methods})
        buckets.append(row)
    return StreamEvalResult(metrics, ratio, fresh / len(scored), len(scored), replayed, buckets, cut, version, seconds)


def format_table(result: StreamEvalResult) -> str:
    lines = [f"{'method':<18} {'HR@10':>7} {'NDCG@10':>8}"]
    for method, m in result.metrics.items():
        lines.append(f"{method:<18} {m['hr@10']:7.4f} {m['ndcg@10']:8.4f}")
    lines.append(
        f"stream/offline: HR@10 {result.ratio['hr@10']:.3f}, NDCG@10 {result.ratio['ndcg@10']:.3f}; "
        f"{result.scored:,} events scored of {result.replayed:,} replayed; "
        f"{result.fresh:.1%} held a list that accounted for the user's previous event"
    )
    return "\n".join(lines)


def write_report(result: StreamEvalResult, log: EventLog, folder: Path, command: str) -> Path:
    """report.md with the table and the metric over time (over-time.png), and results.json."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    dates = [_date(int(b["start_ms"]))[:10] for b in result.buckets]
    styles: dict[str, dict[str, Any]] = {"stream": {"linewidth": 4, "alpha": 0.5}, "offline": {"linestyle": "--"}}
    for method in result.metrics:  # stream and offline often coincide: the styles keep both visible
        values = [b[method] for b in result.buckets]
        ax.plot(range(len(dates)), values, marker="o", label=method, **styles.get(method, {}))
    ax.set_xticks(range(len(dates)), dates, rotation=30, fontsize=7)
    ax.set_xlabel("event time (start of each tenth of the scored events)")
    ax.set_ylabel("HR@10")
    ax.set_title(f"Prequential HR@10 on {log.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "over-time.png", dpi=110)
    plt.close(fig)
    lines = [
        f"# Streaming evaluation on {log.name}",
        "",
        f"Command: `{command}`",
        "",
        f"Model {result.model}, trained on the events before {_date(result.cut_ms)}; "
        f"{result.replayed:,} events replayed through the broker and a worker, {result.scored:,} scored "
        f"(those after the cut whose user had an earlier event), in {result.seconds:.0f} s.",
        "",
        "| method | HR@10 | NDCG@10 |",
        "|---|---|---|",
    ]
    lines += [f"| {method} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} |" for method, m in result.metrics.items()]
    lines += [
        "",
        f"Stream / offline: HR@10 **{result.ratio['hr@10']:.3f}**, NDCG@10 **{result.ratio['ndcg@10']:.3f}**. "
        f"{result.fresh:.1%} of the scored events met a held list that already accounted for the user's "
        "previous event.",
        "",
        "![HR@10 over time](over-time.png)",
    ]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "command": command,
        "data": log.name,
        "model": result.model,
        "metrics": result.metrics,
        "ratio": result.ratio,
        "fresh": result.fresh,
        "scored": result.scored,
        "replayed": result.replayed,
        "over_time": result.buckets,
        "seconds": round(result.seconds, 1),
    }
    (folder / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return folder / "report.md"
