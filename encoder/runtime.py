"""ONNX Runtime sessions for the exported encoders. No torch import.

The CUDA execution provider is used when asked for (or on ``auto``) and a GPU
driver is present; onnxruntime-gpu silently falls back to CPU when CUDA cannot
load, so the provider actually in use is read back from the session and
reported, never assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from encoder.config import (
    INTEREST_OUTPUT,
    MODEL_FILE,
    TEXT_OUTPUT,
    TOKENIZER_FILE,
    BundleManifest,
    InterestEncoderConfig,
)
from encoder.features import EncoderInputs, EventTypeVocabulary
from streams.errors import ModelError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TEXT_MAX_TOKENS = 256


def gpu_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def make_session(model_path: Path, provider: str = "auto", intra_op_threads: int = 0) -> ort.InferenceSession:
    """An inference session on CUDA when wanted and possible, else CPU; ``provider`` is auto|cpu|cuda."""
    want_cuda = provider == "cuda" or (provider == "auto" and gpu_driver_present())
    providers = [CUDA, CPU] if want_cuda and CUDA in ort.get_available_providers() else [CPU]
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
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
    """The exported interest encoder: windows (as ``EncoderInputs``) → user vectors."""

    def __init__(self, bundle: Path, provider: str = "auto", intra_op_threads: int = 0) -> None:
        self.manifest = BundleManifest.read(bundle, "interest-encoder")
        self.config = InterestEncoderConfig.from_dict(self.manifest.config)
        self.vocabulary = EventTypeVocabulary(self.config.event_types)
        self.dim = self.manifest.dim
        self.version = self.manifest.version
        self.max_len = self.config.max_len
        self._session = make_session(bundle / MODEL_FILE, provider, intra_op_threads)
        self.provider = self._session.get_providers()[0]

    def encode_batch(self, inputs: EncoderInputs) -> np.ndarray:
        """[batch, dim] float32 unit vectors."""
        if inputs.item_vectors.shape[-1] != self.dim:
            raise ModelError(f"item vectors have {inputs.item_vectors.shape[-1]} dims, the encoder expects {self.dim}")
        return self._session.run([INTEREST_OUTPUT], inputs.as_feed())[0]
