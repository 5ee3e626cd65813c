"""Build the model bundles a worker needs, or reuse them when their inputs are unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from encoder.config import INTEREST_BUNDLE, TEXT_BUNDLE, BundleManifest, InterestEncoderConfig
from encoder.data import History, TrainingData
from encoder.runtime import OnnxTextEmbedder
from streams.errors import ModelError
from streams.records import EVENT_TYPES
from streams.workload import GeneratedEvent, Workload, WorkloadConfig


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


def workload_histories(workload: Workload, n_users: int, events_per_user: int) -> list[list[GeneratedEvent]]:
    """Histories of users the live stream never sees (their indices start after the live ones)."""
    return workload.histories(n_users, events_per_user, first_user=10_000_000)


def content_hash(workload: Workload, histories: list[list[GeneratedEvent]]) -> str:
    """What the model would learn from: the catalogue's text and every training event."""
    digest = hashlib.sha256()
    for item in workload.catalog:
        digest.update(f"{item.item_id}\t{item.text()}\n".encode())
    for history in histories:
        digest.update("|".join(f"{g.event.item_id},{g.event.type},{g.event.ts}" for g in history).encode())
    return digest.hexdigest()[:16]


def workload_training_data(
    workload: Workload, histories: list[list[GeneratedEvent]], embedder: OnnxTextEmbedder
) -> TrainingData:
    item_ids = [item.item_id for item in workload.catalog]
    vectors = embedder.embed_batch([item.text() for item in workload.catalog])
    index = {item_id: i for i, item_id in enumerate(item_ids)}
    converted = [
        History(
            items=np.array([index[g.event.item_id] for g in history], dtype=np.int64),
            types=[g.event.type for g in history],
            ts_ms=np.array([g.event.ts for g in history], dtype=np.int64),
        )
        for history in histories
    ]
    description = {"source": "generated workload", "users": len(histories), "events": sum(map(len, histories))}
    return TrainingData(item_ids, vectors, converted, description)


def ensure_interest_encoder(
    models: Path,
    workload_config: WorkloadConfig,
    encoder_config: InterestEncoderConfig | None = None,
    *,
    n_users: int = 600,
    events_per_user: int = 60,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Train on the generated workload and export, unless a bundle trained on the same data exists."""
    cfg = encoder_config or InterestEncoderConfig(event_types=EVENT_TYPES)
    text_bundle = ensure_text_encoder(models, progress)
    embedder = OnnxTextEmbedder(text_bundle, provider="cpu")
    workload = Workload(workload_config)
    histories = workload_histories(workload, n_users, events_per_user)
    print_ = fingerprint(cfg, embedder.version, content_hash(workload, histories))
    bundle = models / INTEREST_BUNDLE
    if not force:
        try:
            if BundleManifest.read(bundle, "interest-encoder").training.get("fingerprint") == print_:
                progress(f"reusing the interest encoder in {bundle} (same data and config)")
                return bundle
        except ModelError:
            pass
    from encoder.export import export_interest_encoder
    from encoder.train import train_interest_encoder

    progress(f"embedding {len(workload.catalog):,} catalogue items for training…")
    data = workload_training_data(workload, histories, embedder)
    result = train_interest_encoder(data, cfg, progress)
    manifest = export_interest_encoder(
        result.model,
        bundle,
        training={
            **data.description,
            "fingerprint": print_,
            "seconds": round(result.seconds, 1),
            "device": result.device,
            "text_encoder": embedder.version,
            "history": result.history,
        },
        metrics=result.metrics,
    )
    progress(
        f"interest encoder {manifest.version}: HR@10 {result.metrics['hr@10']:.3f}, "
        f"parity {manifest.parity['max_abs_diff']:.1e}, {result.seconds:.0f}s on {result.device}"
    )
    return bundle
