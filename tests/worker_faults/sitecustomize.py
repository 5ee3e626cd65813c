"""Loaded by a test's worker process (its PYTHONPATH names this folder): faults Faust and aiokafka meet in a
rebalance, on demand. Each is armed by a file holding a number n > 0, which counts down as it strikes.

- ``UNDELIVERED_TRIGGER``: the next n messages of an events topic are taken as read and dropped, never
  handed to the stream, as faust-streaming #596 does.
- ``UNASSIGNED_TRIGGER``: the next n questions for a partition's position fail as aiokafka's do for a
  partition that a rebalance has just taken away.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _strikes(trigger: Path) -> bool:
    left = int(trigger.read_text()) if trigger.exists() else 0
    if left > 0:
        trigger.write_text(str(left - 1))
    return left > 0


if undelivered_path := os.environ.get("UNDELIVERED_TRIGGER"):
    from faust.transport.conductor import Conductor

    undelivered = Path(undelivered_path)
    compile_handler = Conductor._compile_message_handler

    def compile_dropping_handler(self: Conductor) -> Any:
        on_message = compile_handler(self)

        async def dropping(message: Any) -> None:
            if message.topic.endswith(".events") and _strikes(undelivered):
                return None
            return await on_message(message)

        return dropping

    Conductor._compile_message_handler = compile_dropping_handler  # type: ignore[method-assign]

if unassigned_path := os.environ.get("UNASSIGNED_TRIGGER"):
    from aiokafka.errors import IllegalStateError
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    unassigned = Path(unassigned_path)
    position = AIOKafkaConsumerThread.position

    async def position_or_unassigned(self: AIOKafkaConsumerThread, tp: Any) -> int | None:
        if _strikes(unassigned):
            raise IllegalStateError(f"Partition {tp} is not assigned")
        return await position(self, tp)

    AIOKafkaConsumerThread.position = position_or_unassigned  # type: ignore[method-assign]
