"""The stream's own interest encoder, trained on the generated workload (the demo's, the bench's and the
tests' model). The training itself is ``encoder.build``'s; this module turns the workload into its data."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from encoder.build import ensure_text_encoder, fingerprint, reusable, stream_encoder_config, train_and_export
from encoder.config import INTEREST_BUNDLE, TEXT_DIM
from encoder.data import Dataset, History, leave_one_out
from encoder.runtime import OnnxTextEmbedder, cuda_available
from streams.errors import ModelError
from streams.records import Event
from streams.tools.workload import GeneratedEvent, Workload, WorkloadConfig


def workload_histories(workload: Workload, n_users: int, events_per_user: int) -> list[list[GeneratedEvent]]:
    """Histories of users the live stream never sees (their indices start after the live ones)."""
    return workload.histories(n_users, events_per_user, first_user=10_000_000)


def catalogue_walks(workload: Workload, length: int) -> list[list[GeneratedEvent]]:
    """Histories that walk the whole catalogue in order, so that an id-only model learns every id.

    Walks overlap by the two items leave-one-out holds out of each history, so every
    item also occurs in some training part; the last walk wraps around to the start.
    """
    ids = [item.item_id for item in workload.catalog]
    step = max(length - 2, 1)
    start_ms = workload.config.start_ms
    walks = []
    for start in range(0, len(ids), step):
        walk = [ids[(start + j) % len(ids)] for j in range(length)]
        walks.append(
            [
                GeneratedEvent(
                    Event(f"walk-{start}-{j}", f"walk-{start}", item_id, "view", start_ms + j * 60_000),
                    workload.category_of[item_id],
                )
                for j, item_id in enumerate(walk)
            ]
        )
    return walks


def content_hash(workload: Workload, histories: list[list[GeneratedEvent]]) -> str:
    """What the model would learn from: the catalogue's text and every training event."""
    digest = hashlib.sha256()
    for item in workload.catalog:
        digest.update(f"{item.item_id}\t{item.text()}\n".encode())
    for history in histories:
        digest.update("|".join(f"{g.event.item_id},{g.event.type},{g.event.ts}" for g in history).encode())
    return digest.hexdigest()[:16]


def workload_dataset(workload: Workload, histories: list[list[GeneratedEvent]]) -> Dataset:
    item_ids = [item.item_id for item in workload.catalog]
    row = {item_id: i for i, item_id in enumerate(item_ids)}
    converted = {
        str(user): History(
            items=np.array([row[g.event.item_id] for g in history], dtype=np.int64),
            types=[g.event.type for g in history],
            ts_ms=np.array([g.event.ts for g in history], dtype=np.int64),
        )
        for user, history in enumerate(histories)
    }
    return leave_one_out("generated workload", item_ids, converted, [item.text() for item in workload.catalog], True)


def ensure_interest_encoder(
    models: Path,
    workload_config: WorkloadConfig,
    overrides: dict[str, Any] | None = None,
    *,
    n_users: int = 600,
    events_per_user: int = 60,
    cover_catalogue: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Train on the generated workload and export, unless a bundle trained on the same data exists.

    ``cover_catalogue`` adds walks over every item, for an id-only model that must know them all.
    """
    workload = Workload(workload_config)
    cfg = stream_encoder_config(len(workload.catalog), **(overrides or {}))  # bad flags fail first
    embedder = OnnxTextEmbedder(ensure_text_encoder(models, progress), provider="cpu")
    if embedder.dim != TEXT_DIM:
        raise ModelError(f"the text encoder makes {embedder.dim}-d vectors, expected {TEXT_DIM}")
    histories = workload_histories(workload, n_users, events_per_user)
    if cover_catalogue:
        histories += catalogue_walks(workload, events_per_user)
    print_ = fingerprint(cfg, embedder.version, content_hash(workload, histories))
    bundle = models / INTEREST_BUNDLE
    if not force and reusable(bundle, print_, progress):
        return bundle
    dataset = workload_dataset(workload, histories)
    text_vectors = None
    if cfg.text_dim:
        progress(f"embedding {len(workload.catalog):,} catalogue items for training…")
        assert dataset.item_texts is not None
        text_vectors = embedder.embed_batch(dataset.item_texts)
    # A GPU worker runs the float16 user tower (RTREC_ENCODER_PRECISION=auto), so export it where one is.
    train_and_export(dataset, cfg, bundle, text_vectors, print_, progress, fp16=cuda_available())
    return bundle
