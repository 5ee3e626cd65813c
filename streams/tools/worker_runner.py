"""A stream worker run as a child process (`rtrec worker`), for the demo and the tests.

Readiness is Faust's own "[^Worker]: Ready" line, logged once table recovery is
over and the stream partitions are seeked to their committed offsets. Input sent
before that point can hit faust-streaming's recovery race (its issue #596: the stream
can skip messages fetched around the recovery). The worker reads skipped messages back
from the broker (``streams.worker.offset_holes``), but the demo and the bench still send nothing
until a worker is ready, so that their figures do not include that detour.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from streams.clients.kafka_io import group_lag
from streams.errors import RtrecError
from streams.settings import Settings

READY_LINE = b"[^Worker]: Ready"
GENERATION = re.compile(r"generation id (\d+) app consumers id")  # logged by Faust on each assignment
RECOVERED_LINE = "[^---Recovery]: Worker ready"  # logged after each assignment's recovery (READY_LINE only once)


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child worker exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTREC_")}
    env.update({k: v for k, v in settings.describe().items() if v})
    for name, value in settings.secrets().items():
        env[name] = value
    return env


def wait_group_caught_up(
    settings: Settings,
    topic: str,
    timeout_s: float,
    check: Callable[[], None] = lambda: None,
    hint: str = "",
) -> None:
    """Until the consumer group ``settings.app_id`` (the workers) has committed everything on ``topic``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check()
        if group_lag(settings, settings.app_id, topic) == 0:
            return
        time.sleep(0.3)
    raise RtrecError(f"the workers of {settings.app_id!r} did not catch up on {topic} within {timeout_s:.0f} s{hint}")


WORKER_COMMAND = ("-m", "streams", "worker")


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: Path, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.settings = settings
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = log_path.stat().st_size if log_path.exists() else 0  # the log is shared across runs
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *command],
                env=worker_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            lines = self.log().splitlines()
            # A crash's cause comes first; what follows is the shutdown, often with errors of its own.
            cause = crash_cause(lines)
            shown = "\n".join([*cause, "...", *lines[-15:]] if cause else lines[-15:])
            raise RtrecError(f"the worker exited with code {self.process.returncode}; see {self.log_path}\n{shown}")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if READY_LINE.decode() in self.log():
                return
            time.sleep(0.2)
        raise RtrecError(f"the worker was not ready within {timeout_s:.0f} s; see {self.log_path}")

    def settled_generation(self) -> int | None:
        """The consumer-group generation this worker is ready in (None while it recovers or has none)."""
        log = self.log()
        matches = list(GENERATION.finditer(log))
        if not matches or RECOVERED_LINE not in log[matches[-1].end() :]:
            return None
        return int(matches[-1].group(1))

    def wait_caught_up(self, topic: str, timeout_s: float = 120.0) -> None:
        """Until the worker's consumer group has committed everything on ``topic``."""
        wait_group_caught_up(self.settings, topic, timeout_s, self.check_alive, f"; see {self.log_path}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def crash_cause(lines: Sequence[str]) -> list[str]:
    """The traceback of the crash Faust reports ("Crashed reason=..."), else the log's first traceback, with
    the line before it (the message it explains) and its exception line. Earlier tracebacks can be
    retries a worker survived; the crash report names what stopped it."""
    reported = next((n for n, line in enumerate(lines) if "Crashed reason=" in line), 0)
    for start in range(reported, len(lines)):
        if lines[start].startswith("Traceback (most recent call last):"):
            end = start + 1
            while end < len(lines) and lines[end].startswith(" "):
                end += 1
            return list(lines[max(start - 1, 0) : end + 1])
    return []


def wait_group_ready(workers: Sequence[WorkerProcess], timeout_s: float = 120.0) -> None:
    """Until every worker is ready in the same consumer-group generation.

    One worker's "Ready" can come before another's join rebalances the group; input sent
    while a worker recovers in that rebalance meets faust-streaming's recovery race (#596),
    which stalled `rtrec bench` with two workers before the worker read skipped messages back
    (``streams.worker.offset_holes``).
    """
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.wait_ready(timeout_s)
    while time.monotonic() < deadline:
        generations = {worker.settled_generation() for worker in workers}
        if len(generations) == 1 and None not in generations:
            return
        for worker in workers:
            worker.check_alive()
        time.sleep(0.2)
    raise RtrecError(f"{len(workers)} workers did not settle in one consumer-group generation within {timeout_s:.0f} s")
