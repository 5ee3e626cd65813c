"""The worker's Prometheus metrics: what it did, and where its time went.

One ``WorkerMetrics`` per worker, handed to the steps that record into it (never a
module-level registry, so tests and several pipelines in one process stay apart).
``rtrec bench`` reads the same numbers over HTTP to split a run's time by stage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streams.records import DeadLetter

# The pipeline's steps in data order; every second the event path spends is in one of them.
STAGES = ("decode", "state", "lookup", "encode", "upsert", "cooccurrence", "search", "rerank", "produce")
# The clocks a micro-batch is timed by on the events thread: elapsed, the thread's own CPU, and its time
# runnable but waiting for a core (Linux only: the kernel's schedstat says it, nothing portable does).
EVENTS_THREAD_CLOCKS = ("wall", "cpu", "runqueue")
SCHEDSTAT = Path("/proc/thread-self/schedstat")  # CPU time, run-queue wait (ns) and time slices of the reader
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_FRESHNESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_LATENCIES = 100_000  # what the console's percentiles are computed from (a few minutes at full speed)
RECENT_DEAD_LETTERS = 100
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "rtrec_events", "Events read, by outcome", ["outcome"], registry=self.registry
        )  # outcome: added, duplicate, too_old, dead_lettered, erased (by a forget-user command)
        self.forgotten_users = Counter("rtrec_forgotten_users", "Forget-user commands applied", registry=self.registry)
        self.recommendations = Counter("rtrec_recommendations", "Recommendation lists emitted", registry=self.registry)
        self.catalog = Counter(
            "rtrec_catalog_changes", "Catalogue changes, by outcome", ["outcome"], registry=self.registry
        )  # outcome: upserted, deleted, dead_lettered
        self.batch_events = Histogram(
            "rtrec_batch_events", "Events per micro-batch", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.stage_seconds = Histogram(
            "rtrec_stage_seconds",
            "Time per micro-batch in each step of the event path",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.events_thread_seconds = Counter(
            "rtrec_events_thread_seconds",
            "Micro-batches on the events thread, by clock: wall (elapsed), cpu (the thread's own) and runqueue "
            "(runnable, waiting for a core; Linux only); wall minus both: it waited for the interpreter lock",
            ["clock"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "rtrec_consumer_lag",
            "Messages on an input partition this worker owns that are not yet committed",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "rtrec_dead_letters",
            "Messages dead-lettered, by input and by the field at fault (record: the message as a whole)",
            ["input", "field"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "rtrec_vector_store_errors",
            "Vector-store calls that failed, by operation (each is retried with backoff)",
            ["operation"],
            registry=self.registry,
        )
        self.skipped_messages = Counter(
            "rtrec_skipped_messages",
            "Input messages the stream skipped (faust-streaming #596), read back from the broker and processed",
            ["topic"],
            registry=self.registry,
        )
        self.undelivered = Counter(
            "rtrec_undelivered",
            "Output records (lists, dead letters) the broker did not take after the producer's retries, by topic",
            ["topic"],
            registry=self.registry,
        )
        self.model = Gauge(
            "rtrec_model_info", "The loaded interest encoder (value 1)", ["version", "provider"], registry=self.registry
        )
        self.event_to_list = Histogram(
            "rtrec_event_to_list_seconds",
            "From the Kafka timestamp of a user's event to their new list handed to the producer",
            buckets=_FRESHNESS_BUCKETS,
            registry=self.registry,
        )
        self.experiment = Counter(
            "rtrec_experiment",
            "A running experiment's online counts by variant: lists served, users served, engagements (clicks, "
            "add-to-carts, purchases) of its users, credited clicks, credited conversions, hits (credited "
            "engagements), the sum of the credited items' reciprocal ranks, and in an interleaved experiment "
            "the hits credited to each variant's team (team_hits)",
            ["experiment", "variant", "count"],
            registry=self.registry,
        )
        # A short memory of the same, for the console: (wall time, seconds), and the latest dead letters.
        self.recent_latencies: deque[tuple[float, float]] = deque(maxlen=RECENT_LATENCIES)
        self.recent_dead_letters: deque[DeadLetter] = deque(maxlen=RECENT_DEAD_LETTERS)

    def lists_sent(self, event_times_s: Sequence[float], now_s: float) -> None:
        """Lists handed to the producer at ``now_s`` for events stamped ``event_times_s`` (Kafka timestamps)."""
        for event_s in event_times_s:
            self.event_to_list.observe(now_s - event_s)
            self.recent_latencies.append((now_s, now_s - event_s))

    def dead_lettered(self, letters: Sequence[DeadLetter]) -> None:
        self.recent_dead_letters.extend(letters)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)

    @contextmanager
    def events_thread(self) -> Iterator[None]:
        """Counts a micro-batch's time on the events thread (``events_thread_seconds``); run it on that thread."""
        started = time.perf_counter(), time.thread_time(), runqueue_seconds()  # in the order of EVENTS_THREAD_CLOCKS
        try:
            yield
        finally:
            ended = time.perf_counter(), time.thread_time(), runqueue_seconds()
            for clock, start, end in zip(EVENTS_THREAD_CLOCKS, started, ended, strict=True):
                if start is not None and end is not None:
                    self.events_thread_seconds.labels(clock).inc(end - start)

    def serve(self, port: int) -> None:
        """``/metrics`` on ``port`` from a background thread."""
        start_http_server(port, registry=self.registry)


def runqueue_seconds() -> float | None:
    """How long the calling thread has been runnable but waiting for a core, in all; None where the kernel
    does not say (not Linux, or schedstat off)."""
    try:
        return int(SCHEDSTAT.read_bytes().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None
