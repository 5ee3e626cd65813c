"""What the events agent sends once a micro-batch has run (streams.worker.events_agent), with the broker's
deliveries of the batch's windows as futures this test completes: the lists of a model fused with
co-occurrence wait for their windows to reach the changelog, other lists do not. The whole path through
a real broker is in tests/test_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from streams.metrics import WorkerMetrics
from streams.pipeline import EventBatchOutcome, IncomingMessage
from streams.records import Recommendation
from streams.settings import Settings
from streams.worker.events_agent import EventsAgent


class SentLists:
    def __init__(self) -> None:
        self.users: list[str] = []

    async def recommendations(self, recs: Sequence[Recommendation]) -> None:
        self.users += [rec.user_id for rec in recs]

    async def dead_letters(self, letters: Sequence[Any]) -> None:
        assert not letters


async def _sent_before_and_after_the_window_arrives(fused: bool) -> tuple[list[str], list[str]]:
    sent = SentLists()
    events = SimpleNamespace(cooccurrence=object() if fused else None, metrics=WorkerMetrics())
    windows = SimpleNamespace(changelog_topic=SimpleNamespace(get_topic_name=lambda: "windows-changelog"))
    agent = EventsAgent(SimpleNamespace(), Settings(), events, windows, str, sent)  # type: ignore[arg-type]
    message = IncomingMessage(b"u1", b"", "events", 0, 0)
    outcome = EventBatchOutcome(recommendations=[Recommendation("u1", (), "model", "u1-trigger", 0, 0)])
    window_written: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    sending = asyncio.ensure_future(agent.send([message], outcome, [window_written]))
    for _ in range(10):
        await asyncio.sleep(0)
    before = list(sent.users)
    window_written.set_result(None)
    await sending
    return before, sent.users


def test_a_fused_batch_sends_its_lists_once_its_windows_are_in_the_changelog() -> None:
    before, after = asyncio.run(_sent_before_and_after_the_window_arrives(fused=True))
    assert (before, after) == ([], ["u1"])


def test_lists_of_a_model_without_co_occurrence_do_not_wait_for_the_changelog() -> None:
    before, after = asyncio.run(_sent_before_and_after_the_window_arrives(fused=False))
    assert (before, after) == (["u1"], ["u1"])
