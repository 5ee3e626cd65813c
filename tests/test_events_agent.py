"""The events agent's delivery of a micro-batch (streams.worker.events_agent): a batch's lists are sent by a
task of their own while the next batch runs, so what that must still keep is checked here on the agent
itself, with the broker's deliveries as futures this test completes: lists of a fused model wait for their
windows to reach the changelog, batches are delivered in order, and a batch's events are acknowledged only
once its lists are handed on. The whole path through a real broker is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from streams.metrics import WorkerMetrics
from streams.pipeline import EventBatchOutcome, IncomingMessage
from streams.records import Recommendation
from streams.settings import Settings
from streams.worker.events_agent import EventsAgent, Processed


class Recorded:
    """What the agent hands on, in order: the lists it sends and the events it acknowledges."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []

    async def recommendations(self, recs: Sequence[Recommendation]) -> None:
        self.steps += [("list", rec.user_id) for rec in recs]

    async def dead_letters(self, letters: Sequence[Any]) -> None:
        self.steps += [("dead letter", str(letter)) for letter in letters]

    async def ack(self, event: str) -> None:
        self.steps.append(("ack", event))


def _agent(recorded: Recorded, fused: bool) -> EventsAgent:
    events = SimpleNamespace(cooccurrence=object() if fused else None, metrics=WorkerMetrics())
    windows = SimpleNamespace(changelog_topic=SimpleNamespace(get_topic_name=lambda: "windows-changelog"))
    return EventsAgent(SimpleNamespace(), Settings(), events, windows, str, recorded)  # type: ignore[arg-type]


def _batch(user_id: str, windows_written: Sequence[asyncio.Future[Any]]) -> Processed:
    message = IncomingMessage(user_id.encode(), b"", "events", 0, 0)
    rec = Recommendation(user_id, (), "model", f"{user_id}-trigger", 0, 0)
    return Processed([message], EventBatchOutcome(recommendations=[rec]), list(windows_written))


async def _two_batches(fused: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The steps taken while the first batch's window is still on its way, and all steps once it arrived."""
    recorded = Recorded()
    agent = _agent(recorded, fused)
    first_window = asyncio.get_running_loop().create_future()
    second_window = asyncio.get_running_loop().create_future()
    second_window.set_result(None)
    first = asyncio.ensure_future(agent.deliver(_batch("u1", [first_window]), None, recorded, ["e1"]))  # type: ignore[arg-type]
    second = asyncio.ensure_future(agent.deliver(_batch("u2", [second_window]), first, recorded, ["e2"]))  # type: ignore[arg-type]
    for _ in range(10):
        await asyncio.sleep(0)
    waiting = list(recorded.steps)
    first_window.set_result(None)
    await second
    return waiting, recorded.steps


def test_a_fused_batch_sends_its_lists_once_its_windows_are_in_the_changelog_and_batches_keep_their_order() -> None:
    waiting, steps = asyncio.run(_two_batches(fused=True))
    assert waiting == []  # not the first batch's list (its window is on its way), nor the second's before it
    assert steps == [("list", "u1"), ("ack", "e1"), ("list", "u2"), ("ack", "e2")]


def test_lists_of_a_model_without_co_occurrence_do_not_wait_for_the_changelog() -> None:
    waiting, steps = asyncio.run(_two_batches(fused=False))
    assert waiting == [("list", "u1"), ("ack", "e1"), ("list", "u2"), ("ack", "e2")]
    assert steps == waiting
