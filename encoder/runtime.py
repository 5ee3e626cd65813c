"""ONNX Runtime sessions for the exported encoders. No torch import.

The CUDA execution provider is used when asked for (or on ``auto``) and a GPU
driver is present; onnxruntime-gpu silently falls back to CPU when CUDA cannot
load, so the provider actually in use is read back from the session and
reported, never assumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from encoder.config import (
    INTEREST_OUTPUT,
    ITEM_IDS_FILE,
    ITEM_INDEX_INPUT,
    ITEM_OUTPUT,
    ITEM_TEXT_INPUT,
    ITEM_TOWER_FILE,
    MODEL_FILE,
    MODEL_FP16_FILE,
    MODEL_INT8_FILE,
    PRECISIONS,
    TEXT_OUTPUT,
    TOKENIZER_FILE,
    BundleManifest,
    InterestEncoderConfig,
)
from encoder.features import EncoderInputs, EventTypeVocabulary
from streams.errors import ModelError
from streams.fusion import ENCODER_ALONE, Fusion

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TEXT_MAX_TOKENS = 256
CPU_ROWS_PER_CALL = 4
GPU_ROWS_PER_CALL = 256


def gpu_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def cuda_available() -> bool:
    return gpu_driver_present() and CUDA in ort.get_available_providers()


def wants_cuda(provider: str) -> bool:
    """Whether a session for ``provider`` (auto|cpu|cuda) is meant to run on CUDA."""
    return provider == "cuda" or (provider == "auto" and cuda_available())


def make_session(model_path: Path, provider: str = "auto", intra_op_threads: int = 0) -> ort.InferenceSession:
    """An inference session on CUDA when wanted and possible, else CPU; ``provider`` is auto|cpu|cuda."""
    providers = [CUDA, CPU] if wants_cuda(provider) and CUDA in ort.get_available_providers() else [CPU]
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # ORT's pool threads spin after each call by default: between the stream's small, frequent calls they
    # held a core the worker's other threads and the broker needed (event-to-list p99 282 against 140 ms at
    # 270 events/s on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors for corrupt or incompatible models
        raise ModelError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
    if provider == "cuda" and session.get_providers()[0] != CUDA:
        raise ModelError("ENCODER_PROVIDER=cuda, but ONNX Runtime could not start CUDA on this machine")
    return session


class OnnxTextEmbedder:
    """all-MiniLM-L6-v2 (exported with pooling and normalisation) behind tokenizers + ONNX Runtime."""

    def __init__(self, bundle: Path, provider: str = "auto", batch_size: int = 64) -> None:
        self.manifest = BundleManifest.read(bundle, "text-encoder")
        self.dim = self.manifest.dim
        self.version = self.manifest.version
        self.batch_size = batch_size
        self._tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER_FILE))
        # tokenizer.json ships with fixed padding to 128: pad each batch only to its longest text.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=TEXT_MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._session = make_session(bundle / MODEL_FILE, provider)
        self.provider = self._session.get_providers()[0]

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """[n, dim] float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside each chunk.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in chunk])
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }
            out[chunk] = self._session.run([TEXT_OUTPUT], feed)[0]
        return out


class OnnxInterestEncoder:
    """The exported interest encoder: windows (as ``EncoderInputs``) → user vectors.

    Every session call has one shape, [``rows_per_call``, max_len]. ONNX Runtime's kernels sum in an
    order that depends on the shape, so otherwise a window's vector would change in its last bits with
    the batch it came in, and an event replayed after a crash could get a list whose near ties are
    ordered differently from the first. Small calls suit a CPU: a micro-batch below capacity holds one to
    a few windows, padded to the call's shape, and 4 rows took 1.3 ms a call against 8 rows' 2.3 ms, while
    250 windows took 80 and 76 ms (2-core EPYC, one thread). A GPU wants few, large ones.
    """

    def __init__(
        self,
        bundle: Path,
        provider: str = "auto",
        intra_op_threads: int = 0,
        precision: str = "auto",
    ) -> None:
        self.manifest = BundleManifest.read(bundle, "interest-encoder")
        self.config = InterestEncoderConfig.from_dict(self.manifest.config)
        self.vocabulary = EventTypeVocabulary(self.config.event_types)
        self.dim = self.manifest.dim
        self.version = self.manifest.version
        self.max_len = self.config.max_len
        self.interests = self.config.interests
        try:
            self.fusion = Fusion.from_dict(self.manifest.fusion) if self.manifest.fusion else ENCODER_ALONE
        except ValueError as exc:
            raise ModelError(f"{bundle}: {exc}") from None
        if precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        tower_files = {"fp32": MODEL_FILE, "fp16": MODEL_FP16_FILE, "int8": MODEL_INT8_FILE}
        if precision in ("fp16", "int8") and tower_files[precision] not in self.manifest.files:
            raise ModelError(
                f"{bundle} has no {precision} user tower ({tower_files[precision]}); "
                f"export it with `rtrec train --{precision}`"
            )
        # Half precision pays on a GPU's tensor cores; on a CPU it only adds casts.
        auto_fp16 = precision == "auto" and MODEL_FP16_FILE in self.manifest.files and wants_cuda(provider)
        self.precision = "fp16" if auto_fp16 else "fp32" if precision == "auto" else precision
        model_file = tower_files[self.precision]
        self._session = make_session(bundle / model_file, provider, intra_op_threads)
        self.provider = self._session.get_providers()[0]
        self.rows_per_call = CPU_ROWS_PER_CALL if self.provider == CPU else GPU_ROWS_PER_CALL

    def encode_batch(self, inputs: EncoderInputs) -> np.ndarray:
        """[batch, dim] float32 user vectors, [batch, interests, dim] for a model of several (dot-product ranking).

        A window's vector does not depend on the other windows of the batch.
        """
        if inputs.item_vectors.shape[-1] != self.dim:
            raise ModelError(f"item vectors have {inputs.item_vectors.shape[-1]} dims, the encoder expects {self.dim}")
        if inputs.mask.shape[1] > self.max_len:
            raise ModelError(f"windows of {inputs.mask.shape[1]} events exceed the encoder's {self.max_len}")
        return np.concatenate(
            [
                self._session.run([INTEREST_OUTPUT], chunk.as_feed())[0][:real]
                for chunk, real in inputs.fixed_shape_chunks(self.rows_per_call, self.max_len)
            ]
        )


class OnnxItemEncoder:
    """The exported item tower: item ids (and text vectors when the model reads text) → item vectors.

    Ids the model learned keep their learned embedding; any other id is placed by its text alone.
    """

    def __init__(self, bundle: Path, provider: str = "auto", intra_op_threads: int = 0) -> None:
        self.manifest = BundleManifest.read(bundle, "interest-encoder")
        self.config = InterestEncoderConfig.from_dict(self.manifest.config)
        self.dim = self.manifest.dim
        self.version = self.manifest.version
        self.text_dim = self.config.text_dim
        # Retraining changes the tower (and so every item vector) even when nothing else changes.
        files = self.manifest.files
        self.tower_id = hashlib.sha256(f"{files[ITEM_TOWER_FILE]}:{files[ITEM_IDS_FILE]}".encode()).hexdigest()[:12]
        ids = (bundle / ITEM_IDS_FILE).read_text().splitlines()
        # A blank line is an id the model never learned: such items are placed as unseen (by text).
        self._index = {item_id: i + 1 for i, item_id in enumerate(ids) if item_id} if self.config.n_items else {}
        self._session = make_session(bundle / ITEM_TOWER_FILE, provider, intra_op_threads)

    @property
    def reads_text(self) -> bool:
        return self.text_dim > 0

    def knows(self, item_id: str) -> bool:
        return item_id in self._index

    def encode_batch(self, item_ids: Sequence[str], text_vectors: np.ndarray | None = None) -> np.ndarray:
        """[n, dim] float32 item vectors."""
        if not item_ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        feed = {ITEM_INDEX_INPUT[0]: np.fromiter((self._index.get(i, 0) for i in item_ids), np.int64, len(item_ids))}
        if self.reads_text:
            if text_vectors is None or text_vectors.shape != (len(item_ids), self.text_dim):
                raise ModelError(f"the item tower needs a [{len(item_ids)}, {self.text_dim}] text vector array")
            feed[ITEM_TEXT_INPUT[0]] = text_vectors.astype(np.float32, copy=False)
        elif not all(i in self._index for i in item_ids):
            unknown = next(i for i in item_ids if i not in self._index)
            raise ModelError(f"item {unknown!r} is unknown to an id-only model, which cannot place new items")
        return self._session.run([ITEM_OUTPUT], feed)[0]
