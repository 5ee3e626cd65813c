"""Hyper-parameters and the ONNX contracts, declared once.

No torch import here: the stream worker reads the same contract through
``encoder.runtime`` to feed the exported models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from streams.errors import ModelError

# The ONNX contract of the interest encoder (left-padded: the newest event is the last position).
INTEREST_INPUTS = {
    "item_vectors": ("float32", ("batch", "length", "dim")),
    "event_types": ("int64", ("batch", "length")),
    "ages_s": ("float32", ("batch", "length")),
    "mask": ("bool", ("batch", "length")),
}
# float32 [batch, dim], or [batch, interests, dim] for a model of several interests; ranks items by dot product
INTEREST_OUTPUT = "user_vector"

# The ONNX contract of the item tower. item_index is the item's row in the bundle's
# item list (0: an item the model never saw); text_vectors only when the model reads text.
ITEM_INDEX_INPUT = ("item_index", ("int64", ("items",)))
ITEM_TEXT_INPUT = ("text_vectors", ("float32", ("items", "text_dim")))
ITEM_OUTPUT = "item_vector"  # float32 [items, dim]
ITEM_TOWER_FILE = "item_tower.onnx"
ITEM_IDS_FILE = "item_ids.txt"  # one id a line; line i is item index i + 1; blank: an id never learned

# The ONNX contract of the text encoder (mean pooling and L2 normalisation are in the graph).
TEXT_INPUTS = {
    "input_ids": ("int64", ("batch", "tokens")),
    "attention_mask": ("int64", ("batch", "tokens")),
}
TEXT_DIM = 384  # all-MiniLM-L6-v2
TEXT_OUTPUT = "sentence_embedding"  # float32 [batch, 384]; "embedding" collides inside the dynamo exporter

OPSET = 18
BUNDLE_MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
MODEL_FP16_FILE = "model.fp16.onnx"  # the user tower computing in half precision, for CUDA (same contract)
# The user tower with int8 weights (dynamic quantization, for CPU): 2.4x smaller, no faster at this size.
MODEL_INT8_FILE = "model.int8.onnx"
PRECISIONS = ("auto", "fp32", "fp16", "int8")  # auto: fp16 on CUDA when the bundle has it, else fp32; int8 on request
TOKENIZER_FILE = "tokenizer.json"
TEXT_BUNDLE = "text-encoder"  # folder names inside the models directory
INTEREST_BUNDLE = "interest-encoder"


def hyper(default: Any, help: str) -> Any:
    """A hyper-parameter a person sets: the CLI's model flags are these fields, with this help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class InterestEncoderConfig:
    """Every hyper-parameter of the interest encoder and its training, validated."""

    event_types: tuple[str, ...]
    n_items: int = 0  # items with a learned id embedding; 0 = no id embeddings (text only)
    text_dim: int = 0  # dims of the item text vectors; 0 = no text (ids only)
    d_model: int = hyper(64, "width of the towers")
    n_heads: int = hyper(2, "attention heads")
    n_layers: int = hyper(2, "transformer blocks")
    ffn_mult: int = 4
    max_len: int = hyper(50, "newest events a window (and a training sequence) keeps")
    dropout: float = hyper(0.2, "dropout rate")
    interests: int = hyper(
        1, "user vectors per window: > 1 for users of several interests (hard-routed, merged by closest interest)"
    )
    # Training.
    loss: str = hyper("full", "full (softmax over the catalogue) or sampled (uniform negatives)")
    negatives: int = hyper(1024, "negatives per batch for the sampled loss")
    id_dropout: float = hyper(0.0, "share of items trained without their id, so the text path stands alone")
    candidate_id_dropout: float = hyper(
        0.0, "share of the training softmax's items scored without their id, so new items (text only) learn to win"
    )
    tail_adjustment: float = hyper(
        0.0,
        "logit adjustment: training adds this times the log of each item's share of the events to its score, "
        "so rare items are not learnt to be buried (0: off; 1: the balanced softmax)",
    )
    epochs: int = hyper(200, "maximum epochs (early stopping may end sooner)")
    batch_size: int = hyper(128, "sequences per step")
    learning_rate: float = hyper(1e-3, "Adam learning rate")
    weight_decay: float = hyper(0.0, "Adam weight decay")
    patience: int = hyper(10, "epochs without a better validation NDCG@10 before stopping")
    eval_every: int = 1
    valid_users: int = hyper(4096, "validation users scored each epoch (a seeded sample when there are more)")
    refit: bool = hyper(
        False, "after early stopping, train afresh on training + validation targets for the best epoch count"
    )
    fusion_guard: float = hyper(
        0.0,
        "the fusion with co-occurrence is the best on validation among those keeping this share of co-occurrence "
        "alone's NDCG@10 for targets of every popularity (at the lower end of a one-sided 95 % interval), "
        "e.g. 0.9 (0: the best overall)",
    )
    seed: int = hyper(0, "random seed")

    def __post_init__(self) -> None:
        if not self.event_types:
            raise ValueError("event_types must not be empty")
        if self.n_items < 0 or self.text_dim < 0:
            raise ValueError("n_items and text_dim must be >= 0")
        if not self.n_items and not self.text_dim:
            raise ValueError("an item tower needs ids (n_items > 0), text (text_dim > 0), or both")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        for name in ("dropout", "id_dropout", "candidate_id_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be full or sampled, got {self.loss!r}")
        for name in (
            "d_model", "n_heads", "n_layers", "ffn_mult", "max_len", "epochs", "batch_size",
            "negatives", "patience", "eval_every", "valid_users", "interests",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if not 0.0 <= self.fusion_guard <= 1.0:
            raise ValueError(f"fusion_guard must be in [0, 1], got {self.fusion_guard}")
        if not 0.0 <= self.tail_adjustment <= 2.0:
            raise ValueError(f"tail_adjustment must be in [0, 2], got {self.tail_adjustment}")

    @property
    def n_type_ids(self) -> int:
        # Id 0 is padding, 1..n the known types, n+1 any type the model never saw.
        return len(self.event_types) + 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["event_types"] = list(self.event_types)
        return data

    @classmethod
    def hyper_parameters(cls) -> list[tuple[str, type, str]]:
        """(name, type, help) of each field a person sets (``hyper``), for the CLI's model flags."""
        types = get_type_hints(cls)
        return [(f.name, types[f.name], f.metadata["help"]) for f in fields(cls) if "help" in f.metadata]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InterestEncoderConfig:
        return cls(**{**data, "event_types": tuple(data["event_types"])})  # older bundles lack later fields


@contextmanager
def staged_bundle(bundle: Path) -> Iterator[Path]:
    """A staging folder beside ``bundle`` that replaces it only if the block completes,
    so a failed export (or a failed parity check) never leaves a half-written bundle."""
    bundle.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle.name}-", dir=bundle.parent))
    try:
        yield staging
        shutil.rmtree(bundle, ignore_errors=True)
        staging.rename(bundle)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class BundleManifest:
    """What an exported model bundle is: written by export, checked by the runtime."""

    kind: str  # "interest-encoder" | "text-encoder"
    version: str
    dim: int
    opset: int
    inputs: dict[str, Any]
    output: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    item_tower: dict[str, Any] = field(default_factory=dict)  # contract and parity of item_tower.onnx
    fusion: dict[str, Any] = field(default_factory=dict)  # with live co-occurrence (streams.fusion); empty: none

    def write(self, folder: Path) -> None:
        self.files = {name: sha256_file(folder / name) for name in sorted(self.files or _bundle_files(folder))}
        (folder / BUNDLE_MANIFEST).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, folder: Path, kind: str, *, verify: bool = True) -> BundleManifest:
        path = folder / BUNDLE_MANIFEST
        if not path.exists():
            raise ModelError(f"no {kind} bundle at {folder} (missing {BUNDLE_MANIFEST}); run `rtrec train` first")
        try:
            manifest = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"unreadable manifest {path}: {exc}") from None
        if manifest.kind != kind:
            raise ModelError(f"{folder} holds a {manifest.kind}, expected a {kind}")
        if verify:
            for name, expected in manifest.files.items():
                file = folder / name
                if not file.exists() or sha256_file(file) != expected:
                    raise ModelError(f"{file} is missing or does not match its checksum in the manifest")
        return manifest


def _bundle_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_file() and p.name != BUNDLE_MANIFEST]
