"""Train the two towers on training sequences with a next-item objective.

Every position of a sequence predicts the item that follows it, all positions at
once (the encoder is causal). The loss is a softmax over every item the training
sequences hold ("full", exact, the default up to a few hundred thousand items)
or over the true item and negatives drawn uniformly from those and shared by the
batch ("sampled"; uniform sampling needs no logQ correction). Items the training
data never shows are no negatives: they are placed by their text, as a new item is. Validation is the
evaluation protocol itself (full ranking, history removed), on a seeded sample
of validation users; its NDCG@10 drives early stopping and picks the epoch kept.
Seeded and reproducible on CPU; uses a GPU when one is present. With ``tail_adjustment`` the
training logits carry each item's log share of the events (logit adjustment), which the
served scores then lack: rare items are ranked as if every item were equally likely a priori.
"""

from __future__ import annotations

import copy
import ctypes
import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from encoder.config import InterestEncoderConfig
from encoder.data import Dataset, Example, History
from encoder.features import EventTypeVocabulary, ages_from_newest, left_pad
from encoder.fusion import choose_fusion
from encoder.model import InterestEncoder, routed, score_all, user_scores
from encoder.ranking_metrics import RankCounts, summarize
from streams.cooccurrence import CooccurrenceSpec
from streams.fusion import Fusion

Progress = Callable[[str], None]
FUSION_USERS = 25_000  # validation users the fusion choice scores (a seeded sample when there are more)
# glibc's mallopt parameters (malloc.h) and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65_536


@dataclass
class TrainingResult:
    model: InterestEncoder
    history: list[dict[str, float]]
    metrics: dict[str, float]
    seconds: float
    device: str
    epochs_run: int
    fusion: Fusion  # with live co-occurrence, as the validation targets chose it
    fusion_table: list[dict[str, float]]  # every fusion tried, with its validation figures


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class SequenceBatch:
    """Left-padded sequences: model item indices (0 = padding or unseen), types, ages, mask."""

    items: torch.Tensor  # int64 [B, L]
    types: torch.Tensor  # int64 [B, L]
    ages_s: torch.Tensor  # float32 [B, L]
    mask: torch.Tensor  # bool [B, L]

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.items, self.types, self.ages_s, self.mask)))


def pad_histories(histories: Sequence[History], vocabulary: EventTypeVocabulary, max_len: int) -> SequenceBatch:
    """The newest ``max_len`` events of each history, left-padded like the stream's windows
    (``assemble_inputs``) but with model item indices: catalogue row r becomes index r + 1."""
    newest = [h.tail(max_len) for h in histories]
    length = max(1, max(len(h) for h in newest))
    items = left_pad([h.items + 1 for h in newest], length, np.int64)
    return SequenceBatch(
        torch.from_numpy(items),
        torch.from_numpy(left_pad([vocabulary.ids(list(h.types)) for h in newest], length, np.int64)),
        torch.from_numpy(left_pad([ages_from_newest(h.ts_ms) for h in newest], length, np.float32)),
        torch.from_numpy(items > 0),
    )


class CatalogueTensors:
    """What the item tower reads for every catalogue item: indices 1..n and text vectors.

    An item no training sequence contains reads index 0, as an unseen item does when served:
    its id embedding would only ever be pushed down as a negative, so it is placed by its text.
    """

    def __init__(
        self, dataset: Dataset, text_vectors: np.ndarray | None, device: torch.device, refit: bool = False
    ) -> None:
        occurrences = dataset.occurrences(refit)
        learned = torch.from_numpy(occurrences > 0).to(device)
        self.index = torch.arange(1, dataset.n_items + 1, device=device) * learned
        # The training softmax ranks only these: an item published after training is not there to
        # be pushed down, and pushing cold items down at every step taught the model to bury them.
        self.candidates = learned.nonzero().squeeze(1)
        self.candidate_of = torch.full_like(self.index, -1)  # catalogue row -> position among the candidates
        self.candidate_of[self.candidates] = torch.arange(len(self.candidates), device=device)
        # log of each candidate's share of the training events: what logit adjustment adds in training
        counts = torch.from_numpy(occurrences).to(device)[self.candidates].double()
        self.log_share = (counts / counts.sum()).log().float()
        # Indexed by model item index: row 0 (padding / unseen) reads a zero text vector.
        self.text_by_index = (
            None
            if text_vectors is None
            else torch.from_numpy(np.concatenate([np.zeros_like(text_vectors[:1]), text_vectors])).to(device)
        )

    def all_items(self, model: InterestEncoder, id_dropout: float = 0.0) -> torch.Tensor:  # [n_items, d]
        """Every item's vector; with id dropout (in training) a share of them placed by text alone."""
        text = None if self.text_by_index is None else self.text_by_index[1:]
        return model.items(_without_ids(self.index, id_dropout, model), text)

    def routed_loss(
        self, interests: torch.Tensor, targets: torch.Tensor, item_vectors: torch.Tensor, cfg: InterestEncoderConfig
    ) -> torch.Tensor:
        """The next-item loss of the user vectors ``interests`` [B, L, K, d] (each target trains the closest)."""
        users, rows = routed(interests, targets, item_vectors)
        offsets = self.log_share * cfg.tail_adjustment if cfg.tail_adjustment else None
        return next_item_loss(users, self.candidate_of[rows], item_vectors[self.candidates], cfg, offsets)

    def inputs(self, model: InterestEncoder, items: torch.Tensor, id_dropout: float) -> torch.Tensor:
        """Item vectors for a batch of indices; with id dropout some items lose their id (as if unseen)."""
        text = None if self.text_by_index is None else self.text_by_index[items]
        return model.items(_without_ids(items, id_dropout, model), text)


def _without_ids(index: torch.Tensor, id_dropout: float, model: InterestEncoder) -> torch.Tensor:
    """``index`` with a random ``id_dropout`` share set to 0 (unseen) while training."""
    if not id_dropout or not model.training:
        return index
    return index.masked_fill(torch.rand(index.shape, device=index.device) < id_dropout, 0)


@torch.no_grad()
def history_scores(
    model: InterestEncoder,
    item_vectors: torch.Tensor,
    catalogue: CatalogueTensors,
    histories: Sequence[History],
    vocabulary: EventTypeVocabulary,
    device: torch.device,
) -> np.ndarray:
    """[len(histories), n_items]: the torch model's score of every item for each history (``model`` in eval
    mode, ``item_vectors`` its ``catalogue.all_items``, computed once for all the histories to score)."""
    batch = pad_histories(histories, vocabulary, model.cfg.max_len).to(device)
    users = model(catalogue.inputs(model, batch.items, 0.0), batch.types, batch.ages_s, batch.mask)
    return user_scores(users, item_vectors).cpu().numpy()


@torch.no_grad()
def rank_examples(
    model: InterestEncoder,
    catalogue: CatalogueTensors,
    examples: Sequence[Example],
    vocabulary: EventTypeVocabulary,
    device: torch.device,
    batch_size: int = 512,
) -> RankCounts:
    """Full-ranking ranks of each example's target among items not in its history (torch model)."""
    was_training = model.training
    model.eval()
    item_vectors = catalogue.all_items(model)
    parts = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        scores = history_scores(model, item_vectors, catalogue, [e.history for e in chunk], vocabulary, device)
        parts.append(RankCounts.from_scores(scores, [e.target for e in chunk], [e.history.items for e in chunk]))
    model.train(was_training)
    return RankCounts.concatenate(parts)


def next_item_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_vectors: torch.Tensor,
    cfg: InterestEncoderConfig,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each next item; ``hidden`` [N, d] the user vectors, ``targets`` [N] rows of ``item_vectors``.

    ``offsets`` [n_items] are added to the logits in training only (logit adjustment: Menon et al., 2021,
    "Long-tail learning via logit adjustment"): with the log of each item's share added, the scores
    themselves need not carry popularity, and rare items are no longer learnt to be buried."""
    if cfg.loss == "full":
        logits = score_all(hidden, item_vectors)
        return F.cross_entropy(logits if offsets is None else logits + offsets, targets)
    negatives = torch.randint(0, item_vectors.shape[0], (cfg.negatives,), device=hidden.device)
    positive = (hidden * item_vectors[targets]).sum(-1, keepdim=True)
    negative = score_all(hidden, item_vectors[negatives]).masked_fill(negatives[None] == targets[:, None], -math.inf)
    if offsets is not None:
        positive, negative = positive + offsets[targets, None], negative + offsets[negatives]
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


class TrainingSequences:
    """Each training sequence's newest ``max_len + 1`` events: inputs and next-item targets."""

    def __init__(self, histories: Sequence[History], vocabulary: EventTypeVocabulary, max_len: int) -> None:
        usable = [h for h in histories if len(h) >= 2]
        if not usable:
            raise ValueError("training needs sequences with at least 2 events")
        tails = [h.tail(max_len + 1) for h in usable]
        self.inputs = [h.head(len(h) - 1) for h in tails]
        self.targets = [h.items[1:] for h in tails]
        self.vocabulary = vocabulary
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.inputs)

    def epoch_batches(self, batch_size: int, shuffler: random.Random) -> list[list[int]]:
        """Shuffled batches of similar lengths: padding (and its cost) shrinks several-fold on
        data sets of short sequences, while each batch still mixes users at random."""
        order = list(range(len(self)))
        shuffler.shuffle(order)
        pool = batch_size * 32
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda r: len(self.targets[r]))
            batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        shuffler.shuffle(batches)
        return batches

    def batch(self, rows: Sequence[int]) -> tuple[SequenceBatch, torch.Tensor]:
        batch = pad_histories([self.inputs[r] for r in rows], self.vocabulary, self.max_len)
        # Shifted by one so that padding reads -1 (no target).
        targets = left_pad([self.targets[r] + 1 for r in rows], batch.items.shape[1], np.int64) - 1
        return batch, torch.from_numpy(targets)


def train_epoch(
    model: InterestEncoder,
    optimizer: torch.optim.Optimizer,
    sequences: TrainingSequences,
    catalogue: CatalogueTensors,
    shuffler: random.Random,
    device: torch.device,
) -> float:
    """One pass over the training sequences; the mean loss."""
    cfg = model.cfg
    model.train()
    total = 0.0
    batches = sequences.epoch_batches(cfg.batch_size, shuffler)
    for rows in batches:
        batch, targets = sequences.batch(rows)
        batch, targets = batch.to(device), targets.to(device)
        states = model.interest_states(
            catalogue.inputs(model, batch.items, cfg.id_dropout), batch.types, batch.ages_s, batch.mask
        )
        item_vectors = catalogue.all_items(model, cfg.candidate_id_dropout)
        # The current state learns every target; standing interests, each the targets closest to it. Routing
        # among all of them let the current state win nearly every target, and the others learnt nothing.
        loss = catalogue.routed_loss(states[:, :, :1], targets, item_vectors, cfg)
        if states.shape[2] > 1:
            loss = loss + catalogue.routed_loss(states[:, :, 1:], targets, item_vectors, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / len(batches)


def fresh_model(cfg: InterestEncoderConfig, device: torch.device) -> tuple[InterestEncoder, torch.optim.Optimizer]:
    seed_everything(cfg.seed)
    model = InterestEncoder(cfg).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


@contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Keep the memory that training frees for its next step, where the C library is glibc.

    A full softmax allocates and frees tensors of hundreds of MB every step (batch × positions ×
    catalogue logits). glibc serves each from fresh pages of its own mapping and unmaps them on free,
    so the kernel faults and zeroes them in again at every step: on Amazon Beauty a quarter of the
    CPU time was the kernel's. Inside this block such blocks come from the heap and stay there."""
    mallopt = ctypes.CDLL(None).mallopt if platform.libc_ver()[0] == "glibc" else None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


def train_interest_encoder(
    dataset: Dataset,
    cfg: InterestEncoderConfig,
    text_vectors: np.ndarray | None = None,
    progress: Progress = lambda _msg: None,
    device: str | None = None,
) -> TrainingResult:
    with freed_memory_kept():
        return _train(dataset, cfg, text_vectors, progress, device)


def _train(
    dataset: Dataset,
    cfg: InterestEncoderConfig,
    text_vectors: np.ndarray | None,
    progress: Progress,
    device: str | None,
) -> TrainingResult:
    if (text_vectors is None) != (cfg.text_dim == 0):
        raise ValueError("text vectors must be given exactly when the config has text_dim > 0")
    if cfg.n_items not in (0, dataset.n_items):
        raise ValueError(f"config has {cfg.n_items} item ids, the data set {dataset.n_items}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    model, optimizer = fresh_model(cfg, dev)
    vocabulary = EventTypeVocabulary(cfg.event_types)
    catalogue = CatalogueTensors(dataset, text_vectors, dev)
    sequences = TrainingSequences(dataset.train, vocabulary, cfg.max_len)
    shuffler = random.Random(cfg.seed)
    valid = list(dataset.valid)
    if len(valid) > cfg.valid_users:
        valid = shuffler.sample(valid, cfg.valid_users)
    if not valid:
        raise ValueError("training needs validation examples (users with at least 3 events)")
    steps = math.ceil(len(sequences) / cfg.batch_size)
    progress(
        f"training on {dev}: {len(sequences):,} sequences, {dataset.n_items:,} items, "
        f"{cfg.loss} softmax, up to {cfg.epochs} epochs × {steps} steps; validating on {len(valid):,} users"
    )
    best_state, best_score, stale, log = copy.deepcopy(model.state_dict()), -1.0, 0, []
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        row = {"epoch": float(epoch), "train_loss": train_epoch(model, optimizer, sequences, catalogue, shuffler, dev)}
        row["seconds"] = time.perf_counter() - epoch_start
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            row.update(summarize(rank_examples(model, catalogue, valid, vocabulary, dev), prefix="val_"))
            improved = row["val_ndcg@10"] > best_score
            if improved:
                best_score, stale, best_state = row["val_ndcg@10"], 0, copy.deepcopy(model.state_dict())
            else:
                stale += 1
            progress(
                f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  val HR@10 {row['val_hr@10']:.4f}  "
                f"NDCG@10 {row['val_ndcg@10']:.4f}{' *' if improved else ''}  ({row['seconds']:.1f}s)"
            )
        log.append(row)
        if stale >= cfg.patience:
            progress(f"early stop: validation NDCG@10 has not improved for {cfg.patience} evaluations")
            break
    best = max((r for r in log if "val_ndcg@10" in r), key=lambda r: r["val_ndcg@10"])
    metrics = {k: v for k, v in best.items() if k.startswith("val_")} | {"best_epoch": best["epoch"]}
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        item_vectors = catalogue.all_items(model)
    # Chosen before a refit, which learns the validation targets and so could no longer be judged on them.
    # On more users than an epoch's check: the guard judges buckets of a few percent of them.
    fusion_valid = dataset.valid if len(dataset.valid) <= FUSION_USERS else shuffler.sample(dataset.valid, FUSION_USERS)
    fusion, fusion_table = choose_fusion(
        lambda histories: history_scores(model, item_vectors, catalogue, histories, vocabulary, dev),
        dataset.train,
        fusion_valid,
        dataset.item_ids,
        CooccurrenceSpec(),
        cfg.fusion_guard,
        progress,
    )
    if cfg.refit:
        model = refit(dataset, cfg, text_vectors, int(best["epoch"]), dev, progress)
    model.eval()
    return TrainingResult(
        model.cpu(), log, metrics, time.perf_counter() - started, str(dev), epoch, fusion, fusion_table
    )


def refit(
    dataset: Dataset,
    cfg: InterestEncoderConfig,
    text_vectors: np.ndarray | None,
    epochs: int,
    device: torch.device,
    progress: Progress,
) -> InterestEncoder:
    """The final model: trained afresh, with the same seed, on training + validation targets for
    the epoch count validation chose. Validation users can no longer score it (it saw their targets)."""
    model, optimizer = fresh_model(cfg, device)
    catalogue = CatalogueTensors(dataset, text_vectors, device, refit=True)
    sequences = TrainingSequences(
        dataset.training_sequences(refit=True), EventTypeVocabulary(cfg.event_types), cfg.max_len
    )
    shuffler = random.Random(cfg.seed)
    progress(f"refit on training + validation targets: {len(sequences):,} sequences, {epochs} epochs")
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, optimizer, sequences, catalogue, shuffler, device)
        if epoch % 10 == 0 or epoch == epochs:
            progress(f"refit epoch {epoch}/{epochs}  loss {loss:.4f}")
    return model
