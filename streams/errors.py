"""One error tree for the whole project.

Every error a user can trigger derives from ``RtrecError`` so that the CLI can
print one clear line instead of a traceback, and the stream can route bad input
to the dead-letter topic with a precise reason.
"""

from __future__ import annotations


class RtrecError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RtrecError):
    """A setting is missing, malformed or inconsistent."""


class InvalidRecord(RtrecError):
    """A message on a topic does not satisfy its contract.

    ``reason`` is short and precise (it goes into the dead-letter record);
    ``field`` names the offending field when there is one.
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason if field is None else f"field '{field}': {reason}"
        self.field = field
        super().__init__(self.reason)


class ModelError(RtrecError):
    """An exported model bundle is missing, corrupt or incompatible."""


class BrokerError(RtrecError):
    """The local Kafka broker cannot be assembled, started or stopped."""


class VectorStoreError(RtrecError):
    """The vector store refused or failed an operation."""


class DataError(RtrecError):
    """A data set file is missing or malformed (the message names the file and line)."""
