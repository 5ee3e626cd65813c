"""Loaded by a test's worker process (its PYTHONPATH names this folder): makes Faust fetch events and never
hand them to the stream, as faust-streaming #596 does in a rebalance, on demand.

While the file named by ``UNDELIVERED_TRIGGER`` holds a number n > 0, the next n messages of an events topic
are taken as read and dropped (n counts down in the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

if trigger_path := os.environ.get("UNDELIVERED_TRIGGER"):
    from faust.transport.conductor import Conductor

    trigger = Path(trigger_path)
    compile_handler = Conductor._compile_message_handler

    def compile_dropping_handler(self: Conductor) -> Any:
        on_message = compile_handler(self)

        async def dropping(message: Any) -> None:
            left = int(trigger.read_text()) if message.topic.endswith(".events") and trigger.exists() else 0
            if left > 0:
                trigger.write_text(str(left - 1))
                return None
            return await on_message(message)

        return dropping

    Conductor._compile_message_handler = compile_dropping_handler  # type: ignore[method-assign]
