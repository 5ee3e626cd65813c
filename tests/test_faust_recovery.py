"""The worker's table recovery rides through a rebalance that lands while it runs.

The bench's baseline workers crashed once (faust-streaming 0.15.3): the second worker joined while the
first recovered, the rebalance gave the first standby partitions with no offset yet, and the recovery
already running sought them to None ("Offset must be a positive integer"). Timing a rebalance into that
moment is not something a broker test can do at will; the seek it makes is checked here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any, cast

from faust.tables.recovery import Recovery
from faust.types import TP

from streams.settings import Settings
from streams.worker.app import faust_app


class _SeekRecorder:
    """Records the offsets Faust's recovery asks the consumer to seek."""

    def __init__(self) -> None:
        self.sought: dict[TP, Any] = {}

    async def seek_wait(self, offsets: dict[TP, Any]) -> None:
        self.sought.update(offsets)


def _seek(recovery: Recovery, offsets: Counter[TP]) -> dict[TP, Any]:
    consumer = _SeekRecorder()
    asyncio.run(recovery._seek_offsets(cast(Any, consumer), set(offsets), offsets, "standby"))
    return consumer.sought


def test_a_partition_assigned_mid_recovery_is_sought_from_its_start(tmp_path: Path) -> None:
    app = faust_app(Settings(home=tmp_path))
    assert app.tables.recovery.shortlabel == "Recovery"  # its "Worker ready" lines are what runners wait for
    read, unread, assigned_since = (TP("windows-changelog", p) for p in range(3))
    offsets: Counter[TP] = Counter({read: 41, unread: -1, assigned_since: None})  # None: what add_standby leaves
    assert _seek(app.tables.recovery, offsets) == {read: 41, unread: 0, assigned_since: 0}
    # Faust's own recovery seeks None, which aiokafka refuses.
    assert _seek(Recovery(app, app.tables), offsets)[assigned_since] is None
