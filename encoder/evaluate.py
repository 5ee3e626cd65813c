"""Offline evaluation: the exported model and the baselines, on the same split, by the same code.

The model is scored exactly as the stream serves it: item vectors from the
exported item tower (what goes into the vector store), user vectors from the
exported interest encoder fed by the stream's featurizer, ranked by dot
product. A bundle that fuses item co-occurrence (``streams.fusion``) is scored
fused, as the stream serves it, and by its encoder alone. Leave-one-out, full
ranking over the whole catalogue, the user's history removed from the ranking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.baselines import ItemCooccurrence, Scorer, baselines
from encoder.data import Dataset, Example, History
from encoder.features import WindowArrays, assemble_inputs
from encoder.fusion import FusedScorer, fit_cooccurrence
from encoder.ranking_metrics import (
    POPULARITY_BUCKETS,
    RankCounts,
    coverage,
    expected_rank,
    in_bucket,
    intra_list_diversity,
    per_example,
    summarize,
    top_k,
)
from encoder.runtime import OnnxInterestEncoder, OnnxItemEncoder, OnnxTextEmbedder
from streams.errors import ModelError

K = 10
BATCH = 512
LENGTH_BUCKETS = ((1, 4), (5, 9), (10, 19), (20, 49), (50, 199), (200, None))


@dataclass
class MethodResult:
    name: str
    counts: RankCounts
    lists: np.ndarray  # int64 [users, K]: top-K catalogue rows per test user
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class BundleScorer:
    """The exported towers as a ``Scorer``: what the live stream would rank for each history."""

    def __init__(
        self, bundle: Path, dataset: Dataset, text_embedder: OnnxTextEmbedder | None, precision: str = "fp32"
    ) -> None:
        self.users = OnnxInterestEncoder(bundle, provider="cpu", precision=precision)
        items = OnnxItemEncoder(bundle, provider="cpu")
        self.name = f"interest encoder ({self.users.version}{'' if precision == 'fp32' else ', ' + precision})"
        if items.reads_text:
            if dataset.item_texts is None or text_embedder is None:
                raise ValueError("this model reads item text, but the data set has none")
            self.item_vectors = items.encode_batch(dataset.item_ids, text_embedder.embed_batch(dataset.item_texts))
        else:
            # An id-only model cannot place an item it never learned: such an item scores 0 for everyone.
            known = np.array([items.knows(i) for i in dataset.item_ids], dtype=bool)
            self.item_vectors = np.zeros((dataset.n_items, items.dim), dtype=np.float32)
            self.item_vectors[known] = items.encode_batch(
                [i for i, k in zip(dataset.item_ids, known, strict=True) if k]
            )

    def scores(self, histories: Sequence[History]) -> np.ndarray:
        vocabulary = self.users.vocabulary
        windows = [WindowArrays(self.item_vectors[h.items], vocabulary.ids(list(h.types)), h.ts_ms) for h in histories]
        inputs = assemble_inputs(windows, self.users.dim, self.users.max_len)
        scores = self.users.encode_batch(inputs) @ self.item_vectors.T
        return scores if scores.ndim == 2 else scores.max(axis=1)  # several interests: the closest scores


def score_method(scorer: Scorer, examples: Sequence[Example], progress: Callable[[str], None]) -> MethodResult:
    started = time.perf_counter()
    parts, lists = [], []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        scores = scorer.scores([e.history for e in chunk])
        exclude = [e.history.items for e in chunk]
        parts.append(RankCounts.from_scores(scores, [e.target for e in chunk], exclude))
        lists.append(top_k(scores, exclude, K))
    seconds = time.perf_counter() - started
    progress(f"  {scorer.name}: {len(examples):,} users in {seconds:.1f}s")
    return MethodResult(scorer.name, RankCounts.concatenate(parts), np.concatenate(lists), seconds)


def bucket_label(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else (str(low) if low == high else f"{low}–{high}")


def bucketed(
    result: MethodResult,
    values: np.ndarray,
    buckets: Sequence[tuple[int, int | None]],
    reference: MethodResult | None = None,
) -> list[dict]:
    """Each bucket's users and figures; with a ``reference``, also ``result``'s NDCG@10 as a share of
    the reference's over the same users, with its interval (``paired_ratio``)."""
    values_at_k = per_example(result.counts, K)
    ndcg, hits = values_at_k[f"ndcg@{K}"], values_at_k[f"hr@{K}"]
    reference_ndcg = None if reference is None else per_example(reference.counts, K)[f"ndcg@{K}"]
    rows = []
    for low, high in buckets:
        keep = in_bucket(values, low, high)
        if keep.any():
            row: dict[str, Any] = {
                "bucket": bucket_label(low, high),
                "users": int(keep.sum()),
                f"hr@{K}": float(hits[keep].mean()),
                f"ndcg@{K}": float(ndcg[keep].mean()),
            }
            if reference_ndcg is not None and reference_ndcg[keep].mean() > 0:
                row["share_of_reference"] = paired_ratio(ndcg[keep], reference_ndcg[keep])
            rows.append(row)
    return rows


def paired_ratio(values: np.ndarray, reference: np.ndarray, draws: int = 1000) -> tuple[float, float, float]:
    """mean(values) / mean(reference) over the same users, and its 95% interval by a paired bootstrap
    over users (seeded): how sure a bucket's gap to a baseline is, when buckets hold hundreds of users."""
    rng = np.random.default_rng(0)
    ratios = []
    for start in range(0, draws, 100):  # bounded memory: 100 resamples at a time
        sample = rng.integers(len(values), size=(min(100, draws - start), len(values)))
        ratios.append(values[sample].mean(axis=1) / np.maximum(reference[sample].mean(axis=1), 1e-12))
    low, high = np.percentile(np.concatenate(ratios), [2.5, 97.5])
    return float(values.mean() / reference.mean()), float(low), float(high)


@dataclass
class Evaluation:
    dataset: Dataset
    results: list[MethodResult]
    breakdowns: dict[str, dict[str, list[dict]]]
    training: dict
    manifest_metrics: dict

    def table(self) -> list[dict[str, object]]:
        return [{"method": r.name, **r.metrics, "seconds": round(r.seconds, 1)} for r in self.results]


def evaluate(
    dataset: Dataset,
    bundle: Path,
    text_embedder: OnnxTextEmbedder | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    precision: str = "fp32",
) -> Evaluation:
    progress(f"evaluating on {dataset.name}: {len(dataset.test):,} test users, {dataset.n_items:,} items")
    model = BundleScorer(bundle, dataset, text_embedder, precision)
    trained_without = model.users.manifest.training.get("new_items", 0)
    if trained_without != dataset.new_items:
        raise ModelError(
            f"{bundle} was trained with {trained_without} items held out as new, this evaluation holds out "
            f"{dataset.new_items}: give evaluate the --new-items that train had"
        )
    # A refit model also learned the validation targets; the baselines then count them too.
    refit = bool(model.users.manifest.config.get("refit", False))
    scorers: list[Scorer] = [model, *baselines(dataset, refit)]
    fusion = model.users.fusion
    if fusion.active:  # what the stream serves: first
        counts = fit_cooccurrence(dataset.training_sequences(refit), dataset.item_ids, fusion.cooccurrence)
        scorers.insert(0, FusedScorer(model, counts, dataset.item_ids, fusion))
    results = [score_method(s, dataset.test, progress) for s in scorers]
    popularity = dataset.occurrences(refit)
    targets = np.array([e.target for e in dataset.test])
    lengths = np.array([len(e.history) for e in dataset.test])
    cold = popularity[targets] == 0
    for result in results:
        result.metrics = summarize(result.counts)
        result.metrics[f"coverage@{K}"] = coverage(result.lists, dataset.n_items)
        result.metrics[f"diversity@{K}"] = intra_list_diversity(result.lists, model.item_vectors)
        if cold.any():
            cold_counts = result.counts.subset(cold)
            result.metrics[f"cold_hr@{K}"] = summarize(cold_counts)[f"hr@{K}"]
            result.metrics["cold_median_rank"] = float(np.median(expected_rank(cold_counts)))
            result.metrics["cold_users"] = float(cold.sum())
        for group, keep in dataset.test_groups.items():
            of_group = summarize(result.counts.subset(keep))
            result.metrics |= {f"{group} {m}": of_group[m] for m in GROUP_METRICS}
    # What is served (listed first) against item co-occurrence, the strongest simple baseline.
    knn = next(r for r in results if r.name == ItemCooccurrence.name)
    breakdowns = {
        "history length": {
            r.name: bucketed(r, lengths, LENGTH_BUCKETS, knn if i == 0 else None) for i, r in enumerate(results)
        },
        "target popularity (training occurrences)": {
            r.name: bucketed(r, popularity[targets], POPULARITY_BUCKETS, knn if i == 0 else None)
            for i, r in enumerate(results)
        },
    }
    return Evaluation(dataset, results, breakdowns, model.users.manifest.training, model.users.manifest.metrics)


COLUMNS = (
    "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr", "coverage@10", "diversity@10", "cold_hr@10", "cold_median_rank",
)  # fmt: skip
GROUP_METRICS = ("hr@10", "ndcg@10", "users")


def group_columns(dataset: Dataset) -> list[str]:
    return [f"{group} {m}" for group in dataset.test_groups for m in GROUP_METRICS if m != "users"]


def write_report(evaluation: Evaluation, folder: Path, command: str) -> Path:
    """report.md with the tables and plots, and results.json with every number."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if any(c in r.metrics for r in evaluation.results)]
    columns += group_columns(evaluation.dataset)
    lines = [
        f"# Evaluation on {evaluation.dataset.name}",
        "",
        f"Command: `{command}`",
        "",
        "Leave-one-out, full ranking over all items, each user's history removed from the ranking; "
        "ties between scores count at their expected rank.",
        "",
        *_results_table(evaluation, columns),
        "",
        *_notes(evaluation, columns),
        *_breakdown_tables(evaluation),
    ]
    plots = _plots(evaluation, folder)
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    results = {
        "command": command,
        "data": evaluation.dataset.describe(),
        "methods": evaluation.table(),
        "breakdowns": evaluation.breakdowns,
        "training": evaluation.training,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return folder / "report.md"


def _results_table(evaluation: Evaluation, columns: list[str]) -> list[str]:
    names = [
        c.replace("hr@", "Recall@").replace("ndcg@", "NDCG@").replace("mrr", "MRR").replace("_", " ") for c in columns
    ]
    lines = ["| method | " + " | ".join(names) + " | seconds |", "|---" * (len(columns) + 2) + "|"]
    for r in evaluation.results:
        cells = [
            (f"{r.metrics[c]:.0f}" if "rank" in c else f"{r.metrics[c]:.4f}") if c in r.metrics else "" for c in columns
        ]
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.seconds:.1f} |")
    return lines


def _notes(evaluation: Evaluation, columns: list[str]) -> list[str]:
    """The data, the training and what each less common column means."""
    lines = ["Data: " + ", ".join(f"{k} {v}" for k, v in evaluation.dataset.describe().items())]
    training = evaluation.training
    if training:
        lines.append(
            f"Training: {training.get('seconds', '?')} s on {training.get('device', '?')} "
            f"({training.get('hardware', '')}), best epoch {evaluation.manifest_metrics.get('best_epoch', '?')}"
        )
    lines += [f"Note: {n}" for n in evaluation.dataset.notes]
    if "cold_hr@10" in columns:
        lines.append(
            "cold_hr@10, cold_median_rank: Recall@10 and the median rank of the target (1 = first, of "
            f"{evaluation.dataset.n_items:,} items) over users whose test item never occurs in training."
        )
    for group, keep in evaluation.dataset.test_groups.items():
        lines.append(f"{group}: the {int(keep.sum()):,} test users of the group '{group}' alone.")
    lines.append("diversity@10: mean pairwise cosine distance of the top 10, measured with the model's item vectors.")
    return lines


def _breakdown_tables(evaluation: Evaluation) -> list[str]:
    lines = []
    for title, per_method in evaluation.breakdowns.items():
        names = [*per_method, f"first ÷ {ItemCooccurrence.name} (95% interval)"]
        lines += ["", f"## NDCG@10 by {title}", "", "| bucket | users | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 2) + "|")
        first = next(iter(per_method.values()))
        for i, row in enumerate(first):
            cells = [f"{rows[i]['ndcg@10']:.4f}" for rows in per_method.values()]
            share = row.get("share_of_reference")
            cells.append(f"{share[0]:.3f} [{share[1]:.3f}, {share[2]:.3f}]" if share else "")
            lines.append(f"| {row['bucket']} | {row['users']} | " + " | ".join(cells) + " |")
    return lines


def _plots(evaluation: Evaluation, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    history = evaluation.training.get("history") or []
    if history:
        fig, left = plt.subplots(figsize=(7, 4))
        epochs = [row["epoch"] for row in history]
        left.plot(epochs, [row["train_loss"] for row in history], color="tab:blue", label="training loss")
        left.set_xlabel("epoch")
        left.set_ylabel("training loss", color="tab:blue")
        right = left.twinx()
        scored = [row for row in history if "val_ndcg@10" in row]
        right.plot([r["epoch"] for r in scored], [r["val_ndcg@10"] for r in scored], color="tab:red")
        right.set_ylabel("validation NDCG@10", color="tab:red")
        fig.suptitle("Training curve")
        fig.tight_layout()
        fig.savefig(folder / "training.png", dpi=110)
        plt.close(fig)
        written.append("training.png")
    for index, (title, per_method) in enumerate(evaluation.breakdowns.items()):
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(per_method)
        buckets = [row["bucket"] for row in per_method[names[0]]]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(np.arange(len(buckets)) + i * width, [row["ndcg@10"] for row in per_method[name]], width, label=name)
        ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2, buckets)
        ax.set_xlabel(title)
        ax.set_ylabel("NDCG@10")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"by-{'length' if index == 0 else 'popularity'}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
