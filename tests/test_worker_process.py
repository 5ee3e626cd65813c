"""What a test or the bench shows when a worker process dies: the cause, not only the shutdown after it."""

from __future__ import annotations

from streams.tools.worker_runner import crash_cause

LOG = """\
[2026-11-24 04:43:40,001] [28395] [INFO] [^Worker]: Ready
[2026-11-24 04:43:41,000] [28395] [WARNING] Commit failed, retrying
Traceback (most recent call last):
  File "aiokafka/consumer/group_coordinator.py", line 1, in commit_offsets
aiokafka.errors.RequestTimedOutError: [Error 7] RequestTimedOutError
[2026-11-24 04:43:45,100] [28395] [ERROR] [^-App]: Crashed reason=IllegalStateError('Partition x is not assigned')
Traceback (most recent call last):
  File "mode/services.py", line 843, in _execute_task
    await task
  File "streams/agents.py", line 243, in redeliver_stalled
    position = await app.consumer.position(tp)
aiokafka.errors.IllegalStateError: Partition x is not assigned
[2026-11-24 04:43:46,218] [28395] [INFO] [^--Web]: Stopping...
Traceback (most recent call last):
  File "asyncio/base_events.py", line 519, in _check_closed
RuntimeError: Event loop is closed
[2026-11-24 04:43:47,221] [28395] [CRITICAL] [^Worker]: We experienced a crash! Reraising original exception...
"""


def test_the_cause_shown_is_the_crash_faust_reports_with_its_traceback() -> None:
    lines = LOG.splitlines()
    assert crash_cause(lines) == lines[5:12]


def test_without_a_crash_report_the_cause_shown_is_the_first_traceback() -> None:
    lines = [line for line in LOG.splitlines() if "Crashed reason=" not in line]
    assert crash_cause(lines) == lines[1:5]


def test_a_log_without_a_traceback_has_no_cause_to_show() -> None:
    assert crash_cause(["[INFO] Ready", "[INFO] Stopping..."]) == []
