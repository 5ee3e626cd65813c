"""`rtrec bench`: throughput and latency of the live pipeline, next to a naive baseline.

Everything real: the local Kafka broker, worker processes (`rtrec worker`), a
producer process, and an independent consumer of the output topic that matches
every recommendation to the events it accounts for. One run, in order:

1. warm-up: every user sends ``window`` events, so later events meet full windows; or,
   with ``seed_state`` (for up to millions of users), those windows are written straight
   to the windows table's changelog, and the worker recovers them at start as after
   any restart;
2. throughput: ``events`` events as fast as the producer can send them;
3. latency: events at a fixed ``rate`` for ``rate_seconds``;
4. baseline: the same workers restarted with micro-batches of one event (one encoder
   call, one upsert, one search, one send per event) on the same warm state,
   ``baseline_events`` events as fast as possible.

Latency is event time (stamped by the producer when it sends) to arrival on the
output topic. Worker CPU and peak RSS come from /proc; the time split by stage
from the workers' Prometheus metrics, as seconds of worker time per event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.kafka_local import local_broker_for
from infra.processes import free_port
from infra.topics import delete_topics_named, ensure_pipeline_topics
from streams.clients.kafka_io import make_consumer, make_producer
from streams.errors import RtrecError
from streams.metrics import EVENTS_THREAD_CLOCKS, STAGES
from streams.pseudonym import Pseudonyms
from streams.records import Event, decode_recommendation, encode_event, encode_item
from streams.settings import Settings
from streams.tools.worker_runner import WORKER_COMMAND, WorkerProcess, wait_group_ready
from streams.tools.workload import EVENT_TYPE_WEIGHTS, Workload, WorkloadConfig
from streams.worker.catalog_sync import items_collection_name

# The bench model: the stream's architecture (ids only: the event path never reads text,
# and 100k items need no text embedding), trained briefly: its speed, not its quality, is measured.
BENCH_ENCODER = {"text_dim": 0, "id_dropout": 0.0, "loss": "sampled", "epochs": 2, "patience": 1}


LOAD_SHARES = (0.5, 0.8)  # the latency phases' offered rates, as shares of the measured capacity
PROBE_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # the capacity probes' rates, as shares of the drain rate
KEPT_UP_SHARE = 0.97  # a probe is kept up with when the workers serve this share of its offered rate throughout
NATIVE_BUILD_WAIT_S = 600.0  # the recall check waits this long for the native index the workers searched through


def lag_growth(probe: PhaseResult) -> float:
    """How fast the workers fell behind during a paced phase, in seconds of lag per second: the median latency of
    its last tenth of events less that of its first tenth, over the time the producer took between them. Workers
    serving a share ``s`` of the offered rate fall behind at ``1/s - 1``; workers that keep up, at ~0."""
    latencies = probe.latencies_ms
    tenth = len(latencies) // 10
    if not tenth or probe.offered_per_s <= 0:
        return float("inf")
    grown_ms = float(np.median(latencies[-tenth:]) - np.median(latencies[:tenth]))
    return grown_ms / 1000 / ((len(latencies) - tenth) / probe.offered_per_s)


def kept_up(probe: PhaseResult) -> bool:
    """Whether the workers kept up with the probe's offered rate: its events were served at ``KEPT_UP_SHARE`` of
    it, and the lag did not grow faster than serving that share would let it (a lag still growing at the end is
    not bounded, however short the probe kept it)."""
    served = probe.events_per_s >= KEPT_UP_SHARE * probe.offered_per_s
    return served and lag_growth(probe) <= 1 / KEPT_UP_SHARE - 1


@dataclass(frozen=True)
class BenchOptions:
    items: int = 100_000
    users: int = 1_000
    events: int = 20_000
    baseline_events: int = 1_000
    rate: float = 1_000.0
    rate_seconds: float = 20.0
    workers: int = 1
    seed: int = 0
    seed_state: bool = False
    experiment: str = ""  # an experiment file: one more phase, the throughput phase's users with it running
    keep_run_data: bool = False  # the run's topics and stores stay (else only its logs and results)
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("items", "users", "events", "baseline_events", "workers"):
            if getattr(self, name) < 1:
                raise RtrecError(f"bench: --{name.replace('_', '-')} must be >= 1")
        if self.rate < 0 or self.rate_seconds <= 0:
            raise RtrecError("bench: --rate must be >= 0 (0 skips the latency phase) and --rate-seconds > 0")


@dataclass
class PhaseResult:
    name: str
    mode: str  # "micro-batched" or "naive"
    workers: int
    events: int
    seconds: float
    latencies_ms: np.ndarray = field(repr=False)
    cpu_percent: float
    peak_rss_mb: float
    stage_us: dict[str, float]  # worker seconds per event in each stage, in microseconds
    mean_batch: float
    offered_per_s: float = 0.0  # the producer's pace (0: as fast as it can)
    sent_ms: np.ndarray | None = field(default=None, repr=False)  # each event's send time after the phase's first
    # The micro-batches' time on the events thread per event, in microseconds, by clock (``EVENTS_THREAD_CLOCKS``)
    events_thread_us: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "mode": self.mode,
            "workers": self.workers,
            "events": self.events,
            "seconds": round(self.seconds, 2),
            "events_per_s": round(self.events_per_s, 1),
            "offered_per_s": round(self.offered_per_s, 1),
            "latency_ms": {f"p{q}": round(self.percentile(q), 1) for q in (50, 95, 99)},
            "lag_growth_ms_per_s": round(1000 * growth, 1) if math.isfinite(growth := lag_growth(self)) else None,
            "cpu_percent": round(self.cpu_percent, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "mean_batch": round(self.mean_batch, 1),
            "stage_us_per_event": {k: round(v, 1) for k, v in self.stage_us.items()},
            "events_thread_us_per_event": {k: round(v, 1) for k, v in self.events_thread_us.items()},
        }


# ------------------------------------------------------------------ the producer process


def _draw_events(rng: np.random.Generator, n: int, items: int) -> tuple[list[str], list[str]]:
    """Item ids and event types of ``n`` events. Popularity is skewed: a few items get most events, as in any shop."""
    item_index = (items * rng.random(n) ** 3).astype(np.int64)
    types = rng.choice(list(EVENT_TYPE_WEIGHTS), size=n, p=list(EVENT_TYPE_WEIGHTS.values()))
    return [f"item-{i:06d}" for i in item_index], [str(t) for t in types]


def _produce(
    bootstrap: str, topic: str, phase: str, users: Sequence[str], items: int, rate: float, seed: int, sent: Any
) -> None:
    """Send one event per entry of ``users`` (at ``rate`` per second; 0: as fast as possible).

    Runs in its own process so that sending competes with neither the worker nor the
    reader for a Python interpreter. Event ids are ``<phase>:<sequence>``; the send
    times go back through ``sent`` for the latency join.
    """
    settings = Settings(kafka_bootstrap=bootstrap)
    producer = make_producer(settings, linger_ms=2, acks=1)
    item_ids, types = _draw_events(np.random.default_rng(seed), len(users), items)
    stamps = np.zeros(len(users), dtype=np.int64)
    started = time.monotonic()
    for i, user in enumerate(users):
        if rate > 0:
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        ts = time.time_ns() // 1_000_000
        stamps[i] = ts
        event = Event(f"{phase}:{i}", user, item_ids[i], types[i], ts)
        producer.send(topic, key=user.encode("utf-8"), value=encode_event(event))
    producer.flush()
    producer.close()
    sent.send(stamps)


# ------------------------------------------------------------------ state written straight to the changelog

SEED_WINDOWS = 1_000  # distinct windows, repeated across users: building a million event by event takes ~10 min


@dataclass
class StateReport:
    users: int
    seeded_bytes: int  # of the windows written to the changelog (0: warmed up by events)
    seeded_s: float
    ready_s: float  # from the workers' start to ready: the changelog recovery, mostly
    ready_rss_mb: float  # the largest worker's resident memory once ready
    disk_mb: float = float("nan")  # of the largest worker's table store after the run

    def summary(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def seed_state(settings: Settings, users: Sequence[str], items: int, seed: int, say: Callable[[str], None]) -> int:
    """Write each user a full window to the windows table's changelog, keyed and partitioned as a worker
    writes it after the user's ``window_size`` events. Returns the bytes written."""
    from kafka.partitioner.default import murmur2

    from infra.topics import TopicSpec, ensure_topics
    from streams.pipeline import WindowLimits
    from streams.worker.tables import windows_changelog_topic

    topic = windows_changelog_topic(settings)
    compacted = {"cleanup.policy": "compact"}  # as Faust creates a changelog
    ensure_topics(settings, [TopicSpec(topic, settings.topic_partitions, settings.topic_replication, compacted)])
    limits = WindowLimits.of(settings)
    rng = np.random.default_rng(seed)
    size = settings.window_size
    start = time.time_ns() // 1_000_000 - size * 1_000  # a second apart, ending now
    windows = []
    for w in range(min(len(users), SEED_WINDOWS)):
        window = limits.new_window()
        for k, (item_id, event_type) in enumerate(zip(*_draw_events(rng, size, items), strict=True)):
            window.add(Event(f"seed:{w}:{k}", "seed", item_id, event_type, start + k * 1_000))
        windows.append(window.to_bytes())
    state_key = Pseudonyms(settings.pseudonymize_key).of
    producer = make_producer(settings, linger_ms=20, acks=1, batch_size=1 << 20)
    written = 0
    for i, user in enumerate(users):
        key = user.encode("utf-8")
        value = windows[i % len(windows)]
        # The partition of the user's events (the producers' default partitioner), as PartitionedTable writes it.
        partition = (murmur2(key) & 0x7FFFFFFF) % settings.topic_partitions
        producer.send(topic, key=state_key(user).encode("utf-8"), value=value, partition=partition)
        written += len(value)
        if (i + 1) % 100_000 == 0 or i + 1 == len(users):
            say(f"  state: {i + 1:,}/{len(users):,} windows written to {topic}")
    producer.flush()
    producer.close()
    return written


def _disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20 if folder.exists() else 0.0


# ------------------------------------------------------------------ the output reader


class OutputReader:
    """Reads the recommendations topic from its start and notes when each event is answered."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = make_consumer(settings, [settings.recommendations_topic])
        self._answered: dict[str, dict[int, float]] = {}  # phase → sequence → arrival (epoch ms)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                arrived = time.time_ns() / 1e6
                with self._lock:
                    for record in records:
                        for event_id in decode_recommendation(record.value).event_ids:
                            phase, _, seq = event_id.partition(":")
                            self._answered.setdefault(phase, {}).setdefault(int(seq), arrived)

    def answered(self, phase: str) -> dict[int, float]:
        with self._lock:
            return dict(self._answered.get(phase, {}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


# ------------------------------------------------------------------ worker probes


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int, field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


SCRAPED = ("rtrec_stage_seconds_sum", "rtrec_events_thread_seconds_total", "rtrec_batch_events_count")
# The stage table's column for each of the events thread's clocks (``EVENTS_THREAD_CLOCKS``).
THREAD_COLUMNS = {"wall": "events thread", "cpu": "its CPU", "runqueue": "its wait for a core"}


def _scrape(port: int) -> dict[str, float]:
    """The stage sums, the events thread's clocks and the batch count of one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(SCRAPED):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@dataclass
class Probe:
    cpu: float
    metrics: dict[str, float]


class Workers:
    """Worker processes sharing one app id; each has its own embedded store and metrics port."""

    def __init__(self, settings: list[Settings], log_dir: Path, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.settings = settings
        self.processes = [WorkerProcess(s, log_dir / f"worker-{i}.log", command) for i, s in enumerate(settings)]

    def wait_ready(self, timeout_s: float) -> None:
        wait_group_ready(self.processes, timeout_s)

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def probe(self) -> list[Probe]:
        self.check_alive()
        return [
            Probe(_cpu_seconds(p.process.pid), _scrape(s.metrics_port))
            for p, s in zip(self.processes, self.settings, strict=True)
        ]

    def peak_rss_mb(self) -> float:
        return max(_rss_mb(p.process.pid) for p in self.processes)

    def rss_mb(self) -> float:
        return max(_rss_mb(p.process.pid, "VmRSS") for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


# ------------------------------------------------------------------ the run


class Bench:
    def __init__(self, settings: Settings, options: BenchOptions, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        run = uuid.uuid4().hex[:8]
        self.run_dir = settings.home / "bench" / run
        self.isolation = f"bench-{run}"  # the run's topics and collections are named after it
        self.settings = settings.isolated(self.isolation).with_overrides(
            model_dir=str(settings.home / "bench-models" / f"{options.items}-items"),
            experiments="",  # an experiment runs only in its own phase (--experiment)
        )
        self.user_ids = [f"bench-user-{i:07d}" for i in range(options.users)]
        self.recall = float("nan")  # of the store's search against an exact ranking, measured after the phases
        self.search_path = ""  # what answered the workers' searches: Qdrant, or the native index mirroring it
        self.capacity = float("nan")  # the highest offered rate kept up with (find_capacity)
        self.state: StateReport | None = None

    def worker_settings(self, batch_max: int) -> list[Settings]:
        return [
            self.settings.with_overrides(
                home=self.run_dir / f"worker-{i}",
                qdrant_path=str(self.run_dir / f"qdrant-{i}"),
                metrics_port=free_port(),
                batch_max=batch_max,
            )
            for i in range(self.options.workers)
        ]

    def prepare(self) -> None:
        from streams.tools.stream_model import ensure_interest_encoder

        for topic, what in ensure_pipeline_topics(self.settings).items():
            self.say(f"topic {topic}: {what}")
        workload = WorkloadConfig(n_items=self.options.items, n_users=min(self.options.users, 2_000))
        ensure_interest_encoder(
            self.settings.models_path,
            workload,
            BENCH_ENCODER,
            n_users=workload.n_users,
            events_per_user=self.settings.window_size + 10,
            cover_catalogue=True,  # an id-only model places no item it never learned
            progress=self.say,
        )
        records = [(item.item_id, encode_item(item)) for item in Workload(workload).catalog]
        stores = self.worker_settings(self.settings.batch_max)
        for settings in stores[:1] if self.settings.qdrant_url else stores:  # a server is shared, embedded stores not
            load_catalog(settings, records, self.say)

    def phase(self, workers: Workers, name: str, mode: str, users: Sequence[str], rate: float) -> PhaseResult:
        spawn = multiprocessing.get_context("spawn")
        receiver, sender = spawn.Pipe(duplex=False)
        # Events a stopped worker had not committed are replayed by the next: that work is not this phase's.
        workers.processes[0].wait_caught_up(self.settings.events_topic, self.options.timeout_s)
        before = workers.probe()
        producer = spawn.Process(
            target=_produce,
            args=(
                self.settings.bootstrap_servers,
                self.settings.events_topic,
                name,
                list(users),
                self.options.items,
                rate,
                self.options.seed + len(name),
                sender,
            ),
            daemon=True,
        )
        deadline = time.monotonic() + self.options.timeout_s
        producer.start()
        stamps = np.asarray(receiver.recv())
        producer.join()
        answered = self.reader.answered(name)
        while len(answered) < len(users):
            if time.monotonic() > deadline:
                missing = len(users) - len(answered)
                raise RtrecError(f"bench phase {name}: {missing} events unanswered after the timeout")
            workers.check_alive()  # fails fast if a worker died
            time.sleep(0.2)
            answered = self.reader.answered(name)
        after = workers.probe()
        arrivals = np.array([answered[i] for i in range(len(users))])
        seconds = (arrivals.max() - stamps.min()) / 1000

        def grown(metric: str) -> float:
            """How much ``metric`` grew during the phase, summed over the workers."""
            return sum(
                a.metrics.get(metric, 0.0) - b.metrics.get(metric, 0.0) for a, b in zip(after, before, strict=True)
            )

        worker_cpu = sum(a.cpu - b.cpu for a, b in zip(after, before, strict=True))

        def us_per_event(metric: str) -> float:
            return 1e6 * grown(metric) / len(users)

        stage_us = {stage: us_per_event(f'rtrec_stage_seconds_sum{{stage="{stage}"}}') for stage in STAGES}
        events_thread_us = {
            clock: us_per_event(f'rtrec_events_thread_seconds_total{{clock="{clock}"}}')
            for clock in EVENTS_THREAD_CLOCKS
        }
        batches = grown("rtrec_batch_events_count")
        result = PhaseResult(
            name=name,
            mode=mode,
            workers=len(workers.processes),
            events=len(users),
            seconds=seconds,
            latencies_ms=arrivals - stamps,
            cpu_percent=100 * worker_cpu / seconds,
            peak_rss_mb=workers.peak_rss_mb(),
            stage_us=stage_us,
            mean_batch=len(users) / batches if batches else float("nan"),
            offered_per_s=rate,
            sent_ms=stamps - stamps.min(),
            events_thread_us=events_thread_us,
        )
        self.say(
            f"  {name}: {result.events:,} events in {seconds:.1f} s = {result.events_per_s:,.0f} events/s, "
            f"p99 {result.percentile(99):.0f} ms"
        )
        return result

    def find_capacity(self, workers: Workers, drain_rate: float) -> tuple[float, list[PhaseResult]]:
        """The highest offered rate the workers keep up with: offered rates from the throughput phase's drain
        rate down, ``rate_seconds / 2`` each, until one is kept up with (``kept_up``); the lowest probed
        rate when none is."""
        probes = []
        for share in PROBE_SHARES:
            percent = int(100 * share)
            probe = self.paced(
                workers, f"probe{percent}", share * drain_rate, self.options.rate_seconds / 2, 20 + percent
            )
            probes.append(probe)
            keeps_up = kept_up(probe)
            verdict = "kept up with" if keeps_up else "fell behind"
            self.say(f"  {probe.name}: the lag grew {1000 * lag_growth(probe):,.0f} ms a second: {verdict}")
            if keeps_up:
                break
        return probes[-1].offered_per_s, probes

    def load_phases(
        self, workers: Workers, capacity: float, prefix: str = "load", mode: str = "micro-batched"
    ) -> list[PhaseResult]:
        """Latency at a share of the capacity (``find_capacity``), offered for ``rate_seconds``; each share's
        users are the same whatever ``workers`` run them."""
        return [
            self.paced(
                workers,
                f"{prefix}{int(100 * share)}",
                share * capacity,
                self.options.rate_seconds,
                10 + int(100 * share),
                mode,
            )
            for share in LOAD_SHARES
        ]

    def paced(
        self, workers: Workers, name: str, rate: float, seconds: float, salt: int, mode: str = "micro-batched"
    ) -> PhaseResult:
        """A phase of random users' events (drawn with ``salt``) offered at ``rate`` for ``seconds``."""
        users = self.random_users(max(int(rate * seconds), 1), salt)
        return self.phase(workers, name, mode, users, rate)

    def experiment_phase(self, users: Sequence[str]) -> PhaseResult:
        """The throughput phase's users again, on workers running the experiment of ``options.experiment``."""
        settings = [
            s.with_overrides(experiments=self.options.experiment) for s in self.worker_settings(self.settings.batch_max)
        ]
        workers = Workers(settings, self.run_dir / "experiment")
        try:
            workers.wait_ready(self.options.timeout_s)
            return self.phase(workers, "experiment", "micro-batched", users, 0)
        finally:
            workers.stop()

    def ceiling_phases(self, users: Sequence[str]) -> list[PhaseResult]:
        """Faust doing only the pipeline's I/O (streams.tools.ceiling): the throughput phase's events as fast as
        they come, then the latency phases' rates (``ceiling50``, ``ceiling80``), the framework's own latency
        and CPU at the loads the pipeline is measured at. The pipeline's group is then moved past those events."""
        from streams.tools.ceiling import CEILING_COMMAND, start_at_end

        settings = [
            s.with_overrides(app_id=f"{s.app_id}-ceiling", home=s.home.with_name(f"{s.home.name}-ceiling"))
            for s in self.worker_settings(self.settings.batch_max)
        ]
        start_at_end(settings[0], [self.settings.events_topic, self.settings.control_topic])
        ceiling = Workers(settings, self.run_dir / "ceiling", CEILING_COMMAND)
        try:
            ceiling.wait_ready(self.options.timeout_s)
            mode = "Faust I/O only"
            results = [
                self.phase(ceiling, "ceiling", mode, users, 0),
                *self.load_phases(ceiling, self.capacity, "ceiling", mode),
            ]
        finally:
            ceiling.stop()
        # Its events are not the pipeline's: the baseline's workers would answer them all, one at a time, before
        # their phase (~940 events in the bench test, ~30 s; a default run's ceiling sends thousands).
        start_at_end(self.settings, [self.settings.events_topic, self.settings.control_topic])
        return results

    def random_users(self, n: int, salt: int) -> list[str]:
        rng = np.random.default_rng(self.options.seed + salt)
        return [self.user_ids[i] for i in rng.integers(0, len(self.user_ids), n)]

    def run(self) -> list[PhaseResult]:
        options = self.options
        self.prepare()
        self.reader = OutputReader(self.settings)
        results = []
        try:
            window = self.settings.window_size
            seeded_bytes, seeded_s = 0, 0.0
            if options.seed_state:
                self.say(f"state: a full window for each of {options.users:,} users, straight to the changelog…")
                started = time.monotonic()
                seeded_bytes = seed_state(self.settings, self.user_ids, options.items, options.seed, self.say)
                seeded_s = time.monotonic() - started
            throughput_users = self.random_users(options.events, 1)
            started = time.monotonic()
            workers = Workers(self.worker_settings(self.settings.batch_max), self.run_dir)
            try:
                workers.wait_ready(options.timeout_s)
                self.state = StateReport(
                    options.users, seeded_bytes, seeded_s, time.monotonic() - started, workers.rss_mb()
                )
                self.say(f"workers ready in {self.state.ready_s:.1f} s, {self.state.ready_rss_mb:,.0f} MB resident")
                if not options.seed_state:
                    self.say(f"warm-up: {window} events for each of {options.users:,} users…")
                    warm = [user for _ in range(window) for user in self.user_ids]
                    results.append(self.phase(workers, "warmup", "micro-batched", warm, 0))
                throughput = self.phase(workers, "throughput", "micro-batched", throughput_users, 0)
                results.append(throughput)
                if options.rate > 0:
                    results.append(self.paced(workers, "latency", options.rate, options.rate_seconds, 2))
                self.capacity, probes = self.find_capacity(workers, throughput.events_per_s)
                self.say(f"capacity: {self.capacity:,.0f} events/s kept up with")
                results += probes + self.load_phases(workers, self.capacity)
            finally:
                workers.stop()
            if options.experiment:
                results.append(self.experiment_phase(throughput_users))
            results += self.ceiling_phases(throughput_users)
            naive = Workers(self.worker_settings(1), self.run_dir)
            try:
                naive.wait_ready(options.timeout_s)
                users = self.random_users(options.baseline_events, 3)
                results.append(self.phase(naive, "baseline", "naive", users, 0))
            finally:
                naive.stop()
        finally:
            self.reader.close()
        state = self.state
        assert state is not None  # the workers were ready, or the run has raised
        state.disk_mb = max(_disk_mb(s.faust_data_path) for s in self.worker_settings(1))
        # Users with a vector: every user after a warm-up, only those that sent events after a seeding.
        recall_users = list(dict.fromkeys(throughput_users))[:200]
        recall, self.search_path = search_recall(self.worker_settings(1)[0], recall_users, self.options.items)
        (self.run_dir / "results.json").write_text(
            json.dumps(
                {
                    "options": dataclasses.asdict(options),
                    "settings": {k: v for k, v in self.settings.describe().items() if "KEY" not in k},
                    "state": state.summary(),
                    "phases": [r.summary() for r in results],
                    "search_recall@10": round(recall, 4),
                    "search_path": self.search_path,
                    "capacity_per_s": round(self.capacity, 1),
                },
                indent=2,
            )
        )
        self.recall = recall
        write_timelines(self.run_dir, results)
        return results

    def drop_run_data(self) -> None:
        """What only this run reads: its topics (~2 GB a default run, the windows' changelog mostly) and its
        stores (~200 MB embedded); its logs and results stay. A failure here is reported, not raised: it must not
        hide what ended the run."""
        workers = self.worker_settings(1)
        try:
            dropped = delete_topics_named(self.settings, [f"{self.isolation}.", f"{self.settings.app_id}-"])
            self.say(f"  {len(dropped)} topics of this run deleted")
            if self.settings.qdrant_url:  # a shared server: the run's collections, dropped there
                from streams.worker.app import load_components

                components = load_components(workers[0])
                items = items_collection_name(self.settings.items_collection, components.item_encoder)
                with contextlib.closing(components.store) as store:
                    store.drop_collection(items)
                    store.drop_collection(self.settings.users_collection)
        except RtrecError as exc:
            self.say(f"  the run's topics or collections could not all be deleted: {exc}")
        for settings in workers:
            shutil.rmtree(settings.home, ignore_errors=True)
            if not settings.qdrant_url:
                shutil.rmtree(settings.qdrant_local_path, ignore_errors=True)


def search_recall(settings: Settings, user_ids: Sequence[str], n_items: int, k: int = 10) -> tuple[float, str]:
    """How many of the exact top-k items (by dot product over the whole catalogue) the store's search finds,
    searched as the workers searched: through the native index where the embedded store builds one."""
    from streams.ports import SearchQuery
    from streams.stores.edge import EdgeVectorStore
    from streams.worker.app import load_components

    components = load_components(settings)
    store = components.store
    collection = items_collection_name(settings.items_collection, components.item_encoder)
    store.ensure_collection(collection, components.item_encoder.dim)
    store.ensure_collection(settings.users_collection, components.interest_encoder.dim)
    native = isinstance(store, EdgeVectorStore) and store.native_ready(collection, timeout_s=NATIVE_BUILD_WAIT_S)
    try:
        state_key = Pseudonyms(settings.pseudonymize_key).of  # the users collection's ids
        users = store.fetch_vectors(settings.users_collection, [state_key(u) for u in user_ids])
        if not users:
            raise RtrecError(f"bench: none of {len(user_ids)} users has a vector in {settings.users_collection!r}")
        item_ids = [f"item-{i:06d}" for i in range(n_items)]
        items = store.fetch_vectors(collection, item_ids)
        ids = list(items)
        matrix = np.stack([items[i] for i in ids])
        queries = list(users.values())
        exact = np.argsort(-(np.stack(queries) @ matrix.T), axis=1)[:, :k]
        found = store.search_batch(collection, [SearchQuery(q, k, only_available=False) for q in queries])
        hits = [len({ids[j] for j in row} & {h.id for h in got}) for row, got in zip(exact, found, strict=True)]
        return float(np.sum(hits)) / (k * len(queries)), "native index" if native else "Qdrant"
    finally:
        store.close()


def load_catalog(settings: Settings, items: Sequence[tuple[str, bytes]], say: Callable[[str], None]) -> None:
    """Bulk-load encoded catalogue records into ``settings``' store and index them."""
    from streams.pipeline import CatalogBatchProcessor, IncomingMessage
    from streams.worker.app import load_components

    components = load_components(settings)
    store = components.store
    collection = items_collection_name(settings.items_collection, components.item_encoder)
    store.ensure_collection(collection, components.item_encoder.dim)
    catalog = CatalogBatchProcessor(
        components.text_embedder,
        components.item_encoder,
        store,
        items_collection=collection,
        limits=settings.limits(),
    )
    chunk = 2_000
    for start in range(0, len(items), chunk):
        messages = [
            IncomingMessage(key.encode("utf-8"), value, "bulk", 0, start + i)
            for i, (key, value) in enumerate(items[start : start + chunk])
        ]
        outcome = catalog.process(messages)
        if outcome.dead_letters:
            raise RtrecError(f"catalogue record rejected: {outcome.dead_letters[0].error}")
        done = min(start + chunk, len(items))
        if done == len(items) or done // chunk % 10 == 0:
            say(f"  catalogue into {settings.qdrant_local_path}: {done:,}/{len(items):,}")
    say("  indexing the catalogue (HNSW)…")
    store.build_index(collection)
    store.close()


def format_table(results: Sequence[PhaseResult]) -> str:
    header = (
        "| phase | mode | workers | events | events/s | p50 ms | p95 ms | p99 ms | mean batch | worker CPU % "
        "| peak RSS MB |"
    )
    rows = [header, "|" + "---|" * 11]
    for r in results:
        rows.append(
            f"| {r.name} | {r.mode} | {r.workers} | {r.events:,} | {r.events_per_s:,.0f} | {r.percentile(50):.0f} | "
            f"{r.percentile(95):.0f} | {r.percentile(99):.0f} | {r.mean_batch:.1f} | {r.cpu_percent:.0f} | "
            f"{r.peak_rss_mb:.0f} |"
        )
    rows += ["", "worker time per event by stage (µs):", ""]
    thread_columns = " | ".join(THREAD_COLUMNS[clock] for clock in EVENTS_THREAD_CLOCKS)
    rows.append("| phase | " + " | ".join(STAGES) + f" | total | {thread_columns} |")
    rows.append("|" + "---|" * (len(STAGES) + 2 + len(EVENTS_THREAD_CLOCKS)))
    for r in results:
        cells = " | ".join(f"{r.stage_us[s]:.0f}" for s in STAGES)
        thread = " | ".join(f"{r.events_thread_us.get(clock, 0.0):.0f}" for clock in EVENTS_THREAD_CLOCKS)
        rows.append(f"| {r.name} | {cells} | {sum(r.stage_us.values()):.0f} | {thread} |")
    rows += [
        "",
        "(events thread: a batch's steps from decode to re-rank, run off the event loop; what its CPU and its wait "
        "for a core (Linux) leave of the wall time, it waited for the interpreter lock, which the loop's Kafka I/O "
        "holds meanwhile)",
    ]
    batched = next((r for r in results if r.name == "throughput"), None)
    baseline = next((r for r in results if r.mode == "naive"), None)
    ceiling = next((r for r in results if r.name == "ceiling"), None)
    if batched and baseline and baseline.events_per_s > 0:
        rows += [
            "",
            f"speed-up of micro-batching over the naive baseline, same run: "
            f"{batched.events_per_s / baseline.events_per_s:.1f}× events/s",
        ]
    experiment = next((r for r in results if r.name == "experiment"), None)
    if batched and experiment and batched.events_per_s > 0:
        rows.append(
            f"with the experiment running, same users, same run: {experiment.events_per_s:,.0f} events/s "
            f"= {experiment.events_per_s / batched.events_per_s:.0%} of the throughput phase"
        )
    if batched and ceiling and ceiling.events_per_s > 0:
        rows.append(
            f"pipeline / ceiling (Faust doing the same I/O, same run): {batched.events_per_s:,.0f} / "
            f"{ceiling.events_per_s:,.0f} events/s = {batched.events_per_s / ceiling.events_per_s:.0%}"
        )
    by_name = {r.name: r for r in results}
    for r in results:
        if r.name.startswith("load"):
            share, p50, p95, p99 = r.name.removeprefix("load"), r.percentile(50), r.percentile(95), r.percentile(99)
            line = (
                f"at {share}% of the capacity ({r.offered_per_s:,.0f} events/s offered, {r.events_per_s:,.0f} served): "
                f"event→list p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms"
            )
            if framework := by_name.get(f"ceiling{share}"):
                line += (
                    f"; Faust doing only the I/O at that rate: p50 {framework.percentile(50):.0f} ms, "
                    f"p99 {framework.percentile(99):.0f} ms, {framework.cpu_percent:.0f} % CPU against "
                    f"{r.cpu_percent:.0f} %"
                )
            rows.append(line)
    return "\n".join(rows)


def format_state(state: StateReport, table_store: str) -> str:
    how = (
        f"written straight to the changelog ({state.seeded_bytes / 2**20:,.0f} MB in {state.seeded_s:.0f} s)"
        if state.seeded_bytes
        else "built by the warm-up's events"
    )
    return (
        f"state: windows of {state.users:,} users, {how}; table store {table_store}\n"
        f"  workers ready in {state.ready_s:.1f} s, {state.ready_rss_mb:,.0f} MB resident then; "
        f"table store on disk after the run: {state.disk_mb:,.0f} MB (largest worker)"
    )


def run_bench(settings: Settings, options: BenchOptions, say: Callable[[str], None] = print) -> list[PhaseResult]:
    """The bench; with a Qdrant server (``RTREC_QDRANT_URL``), twice in one run: the embedded store, then
    the server, each with the recall of its search, and a table of the two side by side."""
    stores = {"embedded": settings.with_overrides(qdrant_url="")}
    if settings.qdrant_url:
        stores["server"] = settings
    runs: dict[str, tuple[Bench, list[PhaseResult]]] = {}
    with local_broker_for(settings, say):
        for label, store_settings in stores.items():
            if len(stores) > 1:
                say(f"\n=== {label} store ===")
            bench = Bench(store_settings, options, say)
            try:
                runs[label] = (bench, bench.run())
            finally:
                if not options.keep_run_data:
                    bench.drop_run_data()
    for label, (bench, results) in runs.items():
        say(f"\n--- {label} store ---" if len(runs) > 1 else "")
        if bench.state is not None:
            say(format_state(bench.state, settings.table_store))
            say("")
        say(format_table(results))
        say(
            f"capacity: {bench.capacity:,.0f} events/s, the highest offered rate kept up with (probes from the "
            f"throughput phase's drain rate down: {KEPT_UP_SHARE:.0%} served, the lag growing by at most "
            f"{1000 * (1 / KEPT_UP_SHARE - 1):.0f} ms a second)"
        )
        say(
            f"recall@10 of the store's search ({bench.search_path}) against an exact ranking (200 user vectors): "
            f"{bench.recall:.3f}"
        )
        say(f"\n(results: {bench.run_dir / 'results.json'}; latency over time: {bench.run_dir / 'latency.png'})")
    if len(runs) > 1:
        say(
            "\n" + format_store_comparison({label: (bench.recall, results) for label, (bench, results) in runs.items()})
        )
    return runs["server" if "server" in runs else "embedded"][1]


def write_timelines(run_dir: Path, results: Sequence[PhaseResult]) -> None:
    """Each paced phase's event→list latency by send time: ``latency.npz`` (per phase, seconds after its first
    send and milliseconds of latency) and ``latency.png``, where a stall shows as a spike and a lag that grows
    as a ramp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paced = [(r, r.sent_ms / 1000) for r in results if r.offered_per_s > 0 and r.sent_ms is not None]
    if not paced:
        return
    arrays: dict[str, np.ndarray] = {}
    for r, sent_s in paced:
        arrays[f"{r.name}_sent_s"] = sent_s.astype(np.float32)
        arrays[f"{r.name}_latency_ms"] = r.latencies_ms.astype(np.float32)
    # numpy's stubs read any ** mapping as possibly its allow_pickle flag
    np.savez_compressed(run_dir / "latency.npz", **arrays)  # type: ignore[arg-type]
    fig, axes = plt.subplots(len(paced), 1, figsize=(9, 1.9 * len(paced)), squeeze=False)
    for ax, (r, sent_s) in zip(axes[:, 0], paced, strict=True):
        ax.plot(sent_s, r.latencies_ms, ".", markersize=1, alpha=0.4)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(
            f"{r.name}: {r.offered_per_s:,.0f} events/s offered, p50 {r.percentile(50):,.0f} ms, "
            f"p99 {r.percentile(99):,.0f} ms",
            fontsize=9,
            loc="left",
        )
    axes[-1, 0].set_xlabel("seconds after the phase's first event")
    fig.tight_layout()
    fig.savefig(run_dir / "latency.png", dpi=110)
    plt.close(fig)


def format_store_comparison(runs: Mapping[str, tuple[float, Sequence[PhaseResult]]]) -> str:
    """The stores side by side: throughput, latency at the offered rate, the store's stages, recall."""
    rows = [
        "| store | throughput events/s | latency phase p50 / p99 ms | search µs/event | upsert µs/event | recall@10 |",
        "|---|---|---|---|---|---|",
    ]
    for label, (recall, results) in runs.items():
        throughput = next(r for r in results if r.name == "throughput")
        latency = next((r for r in results if r.name == "latency"), None)
        p50_p99 = f"{latency.percentile(50):.0f} / {latency.percentile(99):.0f}" if latency else "-"
        rows.append(
            f"| {label} | {throughput.events_per_s:,.0f} | {p50_p99} | {throughput.stage_us['search']:.0f} | "
            f"{throughput.stage_us['upsert']:.0f} | {recall:.3f} |"
        )
    return "\n".join(rows)
