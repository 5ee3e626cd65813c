"""Window → encoder inputs: the one featurizer shared by training and the live stream.

Numpy only (no torch), so the stream worker and the trainer build bit-identical
inputs. Windows are left-padded: the newest event is always the last position,
and ages are measured from it in event time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class EncoderInputs:
    item_vectors: np.ndarray  # float32 [batch, length, item_dim]
    event_types: np.ndarray  # int64 [batch, length]; 0 = padding
    ages_s: np.ndarray  # float32 [batch, length]; seconds before the newest event
    mask: np.ndarray  # bool [batch, length]; True = a real event

    def as_feed(self) -> dict[str, np.ndarray]:
        return {
            "item_vectors": self.item_vectors,
            "event_types": self.event_types,
            "ages_s": self.ages_s,
            "mask": self.mask,
        }

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def fixed_shape_chunks(self, rows: int, length: int) -> Iterator[tuple[EncoderInputs, int]]:
        """Chunks of exactly [rows, length]: positions left-padded, empty windows after the last one;
        each with how many of its windows are real."""
        extra = length - self.mask.shape[1]
        if extra < 0:
            raise ValueError(f"windows of {self.mask.shape[1]} positions do not fit in {length}")
        for start in range(0, len(self), rows):
            real = min(rows, len(self) - start)

            def fit(array: np.ndarray, start: int = start, real: int = real) -> np.ndarray:
                fitted = np.zeros((rows, length, *array.shape[2:]), dtype=array.dtype)  # np.pad took 10x as long
                fitted[:real, extra:] = array[start : start + real]
                return fitted

            chunk = EncoderInputs(fit(self.item_vectors), fit(self.event_types), fit(self.ages_s), fit(self.mask))
            yield chunk, real


@dataclass(frozen=True)
class WindowArrays:
    """One window as arrays, oldest first."""

    item_vectors: np.ndarray  # float32 [n, item_dim]
    type_ids: np.ndarray  # int64 [n]
    ts_ms: np.ndarray  # int64 [n]


class EventTypeVocabulary:
    """Maps event type names to the ids the model was trained with (from its manifest)."""

    def __init__(self, event_types: Sequence[str]) -> None:
        self.event_types = tuple(event_types)
        self._ids = {name: i + 1 for i, name in enumerate(self.event_types)}
        self.unknown_id = len(self.event_types) + 1

    def ids(self, names: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._ids.get(n, self.unknown_id) for n in names), dtype=np.int64, count=len(names))


def left_pad(
    sequences: Sequence[np.ndarray], length: int, dtype: npt.DTypeLike, trailing: tuple[int, ...] = ()
) -> np.ndarray:
    """Zeros [batch, length, *trailing] with each sequence (at most ``length`` long) at the right end."""
    out: np.ndarray = np.zeros((len(sequences), length, *trailing), dtype=dtype)
    for row, values in enumerate(sequences):
        out[row, length - len(values) :] = values
    return out


def ages_from_newest(ts_ms: np.ndarray) -> np.ndarray:
    """Seconds before the window's newest event (event time)."""
    if not len(ts_ms):
        return np.zeros(0, dtype=np.float32)
    return ((ts_ms[-1] - ts_ms).astype(np.float64) / 1000.0).astype(np.float32)


def assemble_inputs(windows: Sequence[WindowArrays], item_dim: int, max_len: int | None = None) -> EncoderInputs:
    """Left-pad a batch of windows (each keeps its newest ``max_len`` events) into model inputs."""
    if not windows:
        raise ValueError("cannot assemble an empty batch")
    trimmed = [_newest(w, max_len) for w in windows]
    length = max(1, max(len(w.type_ids) for w in trimmed))
    return EncoderInputs(
        item_vectors=left_pad([w.item_vectors for w in trimmed], length, np.float32, (item_dim,)),
        event_types=left_pad([w.type_ids for w in trimmed], length, np.int64),
        ages_s=left_pad([ages_from_newest(w.ts_ms) for w in trimmed], length, np.float32),
        mask=left_pad([np.ones(len(w.type_ids), dtype=bool) for w in trimmed], length, bool),
    )


def _newest(window: WindowArrays, max_len: int | None) -> WindowArrays:
    if max_len is None or len(window.type_ids) <= max_len:
        return window
    return WindowArrays(window.item_vectors[-max_len:], window.type_ids[-max_len:], window.ts_ms[-max_len:])
