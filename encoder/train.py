"""Train the interest encoder on event histories with a next-item objective.

Each training example is a window of a user's events and the item of the event
that followed it. The loss is a full softmax over the catalogue's (fixed) text
vectors: the encoder learns to point, in item space, at what the user does
next. The last event of every user is held out for validation, which drives
early stopping. Seeded and reproducible; uses a GPU when one is present.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from encoder.config import InterestEncoderConfig
from encoder.data import TrainingData
from encoder.features import EncoderInputs, EventTypeVocabulary, WindowArrays, assemble_inputs
from encoder.model import InterestEncoder


@dataclass
class TrainingResult:
    model: InterestEncoder
    history: list[dict[str, float]]
    metrics: dict[str, float]
    seconds: float
    device: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WindowBatcher:
    """Turns (history, target position) pairs into encoder inputs and target indices."""

    def __init__(self, data: TrainingData, cfg: InterestEncoderConfig) -> None:
        self.data = data
        self.cfg = cfg
        vocabulary = EventTypeVocabulary(cfg.event_types)
        self._type_ids = [vocabulary.ids(h.types) for h in data.histories]

    def batch(self, examples: Sequence[tuple[int, int]]) -> tuple[EncoderInputs, np.ndarray]:
        windows = []
        targets = np.empty(len(examples), dtype=np.int64)
        for row, (user, position) in enumerate(examples):
            history = self.data.histories[user]
            start = max(0, position - self.cfg.window)
            windows.append(
                WindowArrays(
                    item_vectors=self.data.item_vectors[history.items[start:position]],
                    type_ids=self._type_ids[user][start:position],
                    ts_ms=history.ts_ms[start:position],
                )
            )
            targets[row] = history.items[position]
        return assemble_inputs(windows, self.cfg.item_dim, self.cfg.max_len), targets


def split_examples(data: TrainingData) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every next-item position for training; each user's last event for validation."""
    train: list[tuple[int, int]] = []
    valid: list[tuple[int, int]] = []
    for user, history in enumerate(data.histories):
        n = len(history.items)
        if n < 2:
            continue
        train.extend((user, position) for position in range(1, n - 1))
        valid.append((user, n - 1))
    if not train or not valid:
        raise ValueError("training needs histories with at least 3 events")
    return train, valid


def to_tensors(inputs: EncoderInputs, device: torch.device) -> tuple[torch.Tensor, ...]:
    return (
        torch.from_numpy(inputs.item_vectors).to(device),
        torch.from_numpy(inputs.event_types).to(device),
        torch.from_numpy(inputs.ages_s).to(device),
        torch.from_numpy(inputs.mask).to(device),
    )


def next_item_loss(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the true next item against the whole catalogue (cosine / temperature)."""
    return F.cross_entropy(users @ items.T / temperature, targets)


@torch.no_grad()
def evaluate(
    model: InterestEncoder,
    batcher: WindowBatcher,
    examples: Sequence[tuple[int, int]],
    items: torch.Tensor,
    device: torch.device,
    k: int = 10,
) -> dict[str, float]:
    """Validation loss, and HR@k / NDCG@k with full ranking and the window's items filtered out."""
    model.eval()
    total_loss, hits, ndcg, counted = 0.0, 0.0, 0.0, 0
    for start in range(0, len(examples), 512):
        chunk = examples[start : start + 512]
        inputs, targets = batcher.batch(chunk)
        users = model(*to_tensors(inputs, device))
        target_t = torch.from_numpy(targets).to(device)
        total_loss += next_item_loss(users, items, target_t, batcher.cfg.temperature).item() * len(chunk)
        scores = users @ items.T
        for row, (user, position) in enumerate(chunk):
            history = batcher.data.histories[user]
            seen = history.items[max(0, position - batcher.cfg.window) : position]
            if targets[row] in seen:
                continue  # the live stream never recommends what is in the window
            scores[row, torch.from_numpy(seen).to(device)] = -math.inf
            rank = int((scores[row] > scores[row, targets[row]]).sum())
            counted += 1
            if rank < k:
                hits += 1
                ndcg += 1.0 / math.log2(rank + 2)
    model.train()
    return {
        "val_loss": total_loss / len(examples),
        f"hr@{k}": hits / max(counted, 1),
        f"ndcg@{k}": ndcg / max(counted, 1),
        "val_users": float(counted),
    }


def train_interest_encoder(
    data: TrainingData,
    cfg: InterestEncoderConfig,
    progress: Callable[[str], None] = lambda _msg: None,
    device: str | None = None,
) -> TrainingResult:
    seed_everything(cfg.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    model = InterestEncoder(cfg).to(dev)
    items = F.normalize(torch.from_numpy(data.item_vectors).to(dev), dim=-1)
    batcher = WindowBatcher(data, cfg)
    train, valid = split_examples(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.learning_rate, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1
    )
    shuffler = random.Random(cfg.seed)
    progress(
        f"training on {dev}: {len(train):,} windows from {len(data.histories):,} users, "
        f"{len(data.item_ids):,} items, {cfg.epochs} epochs × {steps_per_epoch} steps"
    )
    best_state, best_loss, stale, log = copy.deepcopy(model.state_dict()), math.inf, 0, []
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        shuffler.shuffle(train)
        epoch_loss, epoch_start = 0.0, time.perf_counter()
        for step in range(steps_per_epoch):
            inputs, targets = batcher.batch(train[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            loss = next_item_loss(
                model(*to_tensors(inputs, dev)), items, torch.from_numpy(targets).to(dev), cfg.temperature
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item()
        metrics = evaluate(model, batcher, valid, items, dev)
        row = {"epoch": float(epoch), "train_loss": epoch_loss / steps_per_epoch, **metrics}
        log.append(row)
        progress(
            f"epoch {epoch}/{cfg.epochs}  train_loss {row['train_loss']:.3f}  val_loss {metrics['val_loss']:.3f}  "
            f"HR@10 {metrics['hr@10']:.3f}  NDCG@10 {metrics['ndcg@10']:.3f}  "
            f"({time.perf_counter() - epoch_start:.1f}s)"
        )
        if metrics["val_loss"] < best_loss - 1e-4:
            best_loss, stale, best_state = metrics["val_loss"], 0, copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                progress(f"early stop: validation loss has not improved for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    model.eval()
    final = evaluate(model, batcher, valid, items, dev)
    return TrainingResult(model.cpu(), log, final, time.perf_counter() - started, str(dev))
