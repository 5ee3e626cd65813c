"""Build the model bundles a worker needs, or reuse them when their inputs are unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from encoder.config import INTEREST_BUNDLE, TEXT_BUNDLE, TEXT_DIM, BundleManifest, InterestEncoderConfig
from encoder.data import Dataset, EventLog
from encoder.runtime import OnnxTextEmbedder, cuda_available
from streams.errors import ConfigError, ModelError
from streams.records import EVENT_TYPES


def ensure_text_encoder(models: Path, progress: Callable[[str], None] = lambda _msg: None) -> Path:
    bundle = models / TEXT_BUNDLE
    try:
        BundleManifest.read(bundle, "text-encoder")
        return bundle
    except ModelError:
        pass
    from encoder.text import export_text_encoder

    progress("exporting the text encoder (all-MiniLM-L6-v2, offline) to ONNX…")
    manifest = export_text_encoder(bundle)
    progress(f"text encoder ready: {manifest.version}, parity {manifest.parity['max_abs_diff']:.1e}")
    return bundle


def fingerprint(*parts: object) -> str:
    text = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) and not isinstance(p, type) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stream_encoder_config(n_items: int, text_dim: int = TEXT_DIM, **overrides: Any) -> InterestEncoderConfig:
    """The stream's model: ids and text (so items published later are placed by their text alone)."""
    defaults: dict[str, Any] = {"event_types": EVENT_TYPES, "n_items": n_items, "text_dim": text_dim, "id_dropout": 0.3}
    try:
        return InterestEncoderConfig(**(defaults | overrides))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"interest encoder: {exc}") from None


def reusable(bundle: Path, fingerprint_: str, progress: Callable[[str], None]) -> bool:
    """Whether ``bundle`` was trained on the same data with the same config."""
    try:
        if BundleManifest.read(bundle, "interest-encoder").training.get("fingerprint") == fingerprint_:
            progress(f"reusing the interest encoder in {bundle} (same data and config)")
            return True
    except ModelError:
        pass
    return False


def ensure_log_encoder(
    models: Path,
    log: EventLog,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """The stream's model trained on a timestamped log (a leave-one-out split of it), into ``models``.

    Without item text the model is id-only. Reused when trained on the same log with the same config.
    """
    defaults = {} if log.item_texts is not None else {"text_dim": 0, "id_dropout": 0.0}
    cfg = stream_encoder_config(len(log.item_ids), **(defaults | (overrides or {})))
    embedder = OnnxTextEmbedder(ensure_text_encoder(models, progress), provider="cpu")
    digest = hashlib.sha256()
    for item_id, text in zip(log.item_ids, log.item_texts or [""] * len(log.item_ids), strict=True):
        digest.update(f"{item_id}\t{text}\n".encode())
    for user in sorted(log.histories):
        history = log.histories[user]
        digest.update(f"{user}:{history.items.tobytes().hex()}:{','.join(history.types)}:".encode())
        digest.update(history.ts_ms.tobytes())
    print_ = fingerprint(cfg, embedder.version, digest.hexdigest()[:16])
    bundle = models / INTEREST_BUNDLE
    if reusable(bundle, print_, progress):
        return bundle
    text_vectors = None
    if cfg.text_dim:
        assert log.item_texts is not None
        progress(f"embedding {len(log.item_ids):,} item texts for training…")
        text_vectors = embedder.embed_batch(log.item_texts)
    train_and_export(log.split(), cfg, bundle, text_vectors, print_, progress, fp16=cuda_available())
    return bundle


def hardware() -> str:
    """The CPU model and core count, stated next to every training time."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def train_and_export(
    dataset: Dataset,
    cfg: InterestEncoderConfig,
    bundle: Path,
    text_vectors: np.ndarray | None,
    fingerprint_: str,
    progress: Callable[[str], None],
    device: str | None = None,
    fp16: bool = False,
    int8: bool = False,
) -> BundleManifest:
    from encoder.export import export_interest_encoder
    from encoder.train import train_interest_encoder

    result = train_interest_encoder(dataset, cfg, text_vectors, progress, device)
    # Ids the model never learned are left out (blank lines), so they are served as unseen: by text.
    learned = dataset.trained_items(cfg.refit)
    manifest = export_interest_encoder(
        result.model,
        [item_id if known else "" for item_id, known in zip(dataset.item_ids, learned, strict=True)],
        bundle,
        training={
            **dataset.describe(),
            "fingerprint": fingerprint_,
            "seconds": round(result.seconds, 1),
            "device": result.device,
            "hardware": hardware() if result.device == "cpu" else result.device,
            "epochs_run": result.epochs_run,
            "history": result.history,
            "fusion_choice": result.fusion_table,
        },
        metrics=result.metrics,
        fusion=result.fusion,
        fp16=fp16,
        int8=int8,
    )
    progress(
        f"interest encoder {manifest.version}: validation NDCG@10 {result.metrics['val_ndcg@10']:.4f} "
        f"(HR@10 {result.metrics['val_hr@10']:.4f}), parity {manifest.parity['max_abs_diff']:.1e}, "
        f"{result.seconds:.0f}s on {result.device}"
    )
    return manifest
