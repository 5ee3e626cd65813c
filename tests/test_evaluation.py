"""Offline evaluation: metrics against hand-computed cases, the loaders, the baselines, and
train → export → evaluate through the CLI on generated data."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from encoder.baselines import ItemCooccurrence, Popularity, RecentPopularity
from encoder.data import History, leave_one_out
from encoder.datasets import load_dataset
from encoder.evaluate import BundleScorer, paired_ratio
from encoder.ranking_metrics import RankCounts, coverage, intra_list_diversity, summarize, top_k
from streams.cli import main
from streams.errors import DataError

# ------------------------------------------------------------------ metrics


def test_rank_counts_remove_the_history_but_never_the_target() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    # Target 3: items 0, 1 and 2 score higher, but item 0 is in the history.
    counts = RankCounts.from_scores(scores, [3], [np.array([0, 3])])
    assert counts.greater.tolist() == [2] and counts.ties.tolist() == [0]


def test_metrics_match_hand_computed_values() -> None:
    # Ranks 0, 3 and 12 (0-based), no ties.
    counts = RankCounts(np.array([0, 3, 12]), np.array([0, 0, 0]))
    got = summarize(counts)
    assert got["hr@10"] == pytest.approx(2 / 3)
    assert got["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 3)
    assert got["hr@20"] == pytest.approx(1.0)
    assert got["ndcg@20"] == pytest.approx((1.0 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)


def test_ties_count_at_their_expected_rank() -> None:
    # The target ties with 19 others right at the top: a random order puts it in the top 10 half the time.
    got = summarize(RankCounts(np.array([0]), np.array([19])))
    assert got["hr@10"] == pytest.approx(0.5)
    assert got["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / 20)
    # A constant scorer is exactly as good as chance.
    scores = np.zeros((1, 100))
    chance = summarize(RankCounts.from_scores(scores, [7], [np.array([], dtype=np.int64)]))
    assert chance["hr@10"] == pytest.approx(0.1)


def test_top_k_coverage_and_diversity() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.8, 0.1, 0.6, 0.2]])
    lists = top_k(scores, [np.array([1]), np.array([], dtype=np.int64)], 2)
    assert lists.tolist() == [[3, 2], [0, 2]]
    assert coverage(lists, 4) == pytest.approx(3 / 4)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert intra_list_diversity(np.array([[0, 1], [0, 2]]), vectors) == pytest.approx(0.5)


# ------------------------------------------------------------------ baselines


def _toy() -> tuple[list[str], dict[str, History]]:
    def h(*items: int) -> History:
        return History(np.array(items), ["view"] * len(items), np.arange(len(items)) * 1000)

    return [f"i{i}" for i in range(5)], {"a": h(0, 1, 2, 0, 1), "b": h(0, 1, 3, 4, 0), "c": h(2, 3, 4)}


def test_baselines_score_what_they_claim() -> None:
    ids, histories = _toy()
    data = leave_one_out("toy", ids, histories, has_time=True)
    popularity = Popularity(data).scores([data.test[0].history])[0]
    assert popularity.tolist() == [2.0, 2.0, 2.0, 1.0, 0.0]  # training sequences: 0 1 2 | 0 1 3 | 2
    recent = RecentPopularity(data, half_life_days=1e-9).scores([data.test[0].history])[0]
    assert recent.round(6).tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]  # only the newest training events count
    cooccurrence = ItemCooccurrence(data).scores([History(np.array([0]), ["view"], np.zeros(1))])[0]
    assert np.argmax(cooccurrence) == 1  # 1 follows 0 in every training sequence that has 0


# ------------------------------------------------------------------ loaders


def test_s3rec_loader_and_leave_one_out(tmp_path: Path) -> None:
    file = tmp_path / "Tiny.txt"
    file.write_text("u1 10 11 12 13\nu2 11 12 14\nu3 10 14\n")
    data = load_dataset(file, "s3rec")
    assert data.item_ids == ["10", "11", "12", "13", "14"]
    assert [len(h) for h in data.train] == [2, 1, 2]  # u3 is too short to split: all of it trains
    assert [(e.user, e.target) for e in data.test] == [("u1", 3), ("u2", 4)]
    assert [e.history.items.tolist() for e in data.valid] == [[0, 1], [1]]
    # A refit trains on everything before the test targets.
    assert [h.items.tolist() for h in data.training_sequences(refit=True)] == [[0, 1, 2], [1, 2], [0, 4]]
    assert data.trained_items(refit=True).tolist() == [True, True, True, False, True]
    file.write_text("u1 10 11\nu1 12 13\n")
    with pytest.raises(DataError, match=re.escape("Tiny.txt:2: user u1 appears twice")):
        load_dataset(file, "s3rec")


def test_sasrec_loader_uses_the_validation_users_full_history(tmp_path: Path) -> None:
    for name, text in {
        "train/input.txt": "1 2 3\n4 5 6\n6\n",
        "test/output.txt": "9\n8\n7\n",
        "val/input.txt": "1 2 3 6\n",
        "val/output.txt": "7\n",
    }.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    data = load_dataset(tmp_path, "sasrec")
    ids = data.item_ids
    assert [ids[i] for i in data.test[0].history.items] == ["1", "2", "3", "6", "7"]
    assert ids[data.test[0].target] == "9" and ids[data.valid[0].target] == "7"
    assert [ids[i] for i in data.test[1].history.items] == ["4", "5", "6"]
    assert data.test_groups["complete"].tolist() == [True, False, False]  # only user 1's history is complete
    # The other users' last training item is held out for validation (a user of one item has none to
    # spare); a refit trains on it again.
    assert [(e.user, [ids[i] for i in e.history.items], ids[e.target]) for e in data.valid] == [
        ("1", ["1", "2", "3", "6"], "7"),
        ("2", ["4", "5"], "6"),
    ]
    assert [[ids[i] for i in h.items] for h in data.training_sequences(refit=False)] == [
        ["1", "2", "3", "6"],
        ["4", "5"],
        ["6"],
    ]
    assert [[ids[i] for i in h.items] for h in data.training_sequences(refit=True)] == [
        ["1", "2", "3", "6", "7"],
        ["4", "5", "6"],
        ["6"],
    ]
    (tmp_path / "val/input.txt").write_text("1 2 9 9\n")
    with pytest.raises(DataError, match="matches no single training line"):
        load_dataset(tmp_path, "sasrec")


def test_unisrec_loader_reads_text_and_marks_cold_items(tmp_path: Path) -> None:
    (tmp_path / "X.text").write_text("item_id:token\ttext:token_seq\nA\tglue. tools.\nB\ttape.\nC\tsaw.\n")
    (tmp_path / "X.item2index").write_text("A\t0\nB\t1\nC\t2\n")
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (tmp_path / "X.valid.inter").write_text(header + "0\t0\t1\n")
    (tmp_path / "X.test.inter").write_text(header + "0\t0 1\t2\n")
    data = load_dataset(tmp_path, "unisrec")
    assert data.item_texts == ["glue. tools.", "tape.", "saw."]
    assert data.trained_items().tolist() == [True, False, False]
    assert data.trained_items(refit=True).tolist() == [True, True, False]
    (tmp_path / "X.test.inter").write_text(header + "0\t0 1\t7\n")
    with pytest.raises(DataError, match=re.escape("X.test.inter:2: item index outside")):
        load_dataset(tmp_path, "unisrec")


def test_ml100k_loader_orders_by_time_with_titles(tmp_path: Path) -> None:
    (tmp_path / "u.genre").write_text("Action|0\nComedy|1\n\n", encoding="latin-1")
    (tmp_path / "u.item").write_text(
        "1|Heat (1995)|01-Jan-1995||url|1|0\n2|Babe (1995)|01-Jan-1995||url|0|1\n3|Crème (1996)|x||u|1|1\n",
        encoding="latin-1",
    )
    (tmp_path / "u.data").write_text("7\t2\t5\t300\n7\t1\t4\t100\n7\t3\t3\t200\n")
    data = load_dataset(tmp_path, "ml-100k")
    assert data.has_time and data.item_texts is not None
    assert data.item_texts[2] == "Crème (1996). Action, Comedy."
    assert [data.item_ids[i] for i in data.test[0].history.items] == ["1", "3"]
    assert data.test[0].history.ts_ms.tolist() == [100_000, 200_000]


def test_generic_loader_csv_jsonl_parquet_and_its_errors(tmp_path: Path) -> None:
    rows = [("u1", "a", "view", 10), ("u1", "b", "click", 20), ("u1", "c", "purchase", 30), ("u2", "a", "", 5)]
    csv_file = tmp_path / "events.csv"
    with csv_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "type", "ts"])
        writer.writerows(rows)
    jsonl_file = tmp_path / "events.jsonl"
    records = [dict(zip(["user_id", "item_id", "type", "ts"], r, strict=True)) for r in rows]
    jsonl_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_file = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet_file)
    for file in (csv_file, jsonl_file, parquet_file):
        data = load_dataset(file, "generic")
        assert data.has_time and data.test[0].history.ts_ms.tolist() == [10_000, 20_000]
        assert list(data.test[0].history.types) == ["view", "click"]
    items = tmp_path / "items.csv"
    items.write_text("item_id,text\na,red shoe\nb,blue shoe\nc,hat\n")
    assert load_dataset(csv_file, "generic", items).item_texts == ["red shoe", "blue shoe", "hat"]
    bad = {
        "user_id,item_id\nu1,\n": "events.csv:2: missing item_id",
        "user_id,item_id,ts\nu1,a,yesterday\n": "ts 'yesterday' is not an epoch number",
        "user_id,item_id,ts\nu1,a,1\nu1,b,\n": "ts must be given on every row or on none",
        "user_id,item_id\n": "no events",
    }
    for text, message in bad.items():
        csv_file.write_text(text)
        with pytest.raises(DataError, match=message):
            load_dataset(csv_file, "generic")
    jsonl_file.write_text('{"user_id": "u1"\n')
    with pytest.raises(DataError, match=re.escape("events.jsonl:1: not JSON")):
        load_dataset(jsonl_file, "generic")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(csv_file, "excel")


# ------------------------------------------------------------------ end to end


def _sequential_csv(path: Path, users: int = 400, items: int = 60, length: int = 14, seed: int = 0) -> None:
    """Users walk the catalogue in steps of +1 or +7 (a per-user habit), from a random start:
    the next item follows from the last ones, and every item is about equally popular."""
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "type", "ts"])
        for user in range(users):
            step, item = (1, 7)[user % 2], int(rng.integers(items))
            for position in range(length):
                writer.writerow([f"u{user}", f"item{item}", "view", 1_700_000_000 + 60 * position])
                item = (item + step) % items


def test_train_export_evaluate_beats_popularity_by_far(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "events.csv"
    _sequential_csv(data)
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    flags = ["--d-model", "32", "--epochs", "25", "--patience", "5", "--learning-rate", "0.005", "--max-len", "20"]
    assert (
        main(["--model-dir", str(tmp_path / "models"), "train", "--data", str(data), "--out", str(bundle), *flags]) == 0
    )
    assert main(["evaluate", "--data", str(data), "--bundle", str(bundle), "--report", str(report)]) == 0
    results = json.loads((report / "results.json").read_text())
    by_method = {m["method"].split(" (")[0]: m for m in results["methods"]}
    model, popularity = by_method["interest encoder"], by_method["popularity"]
    assert model["ndcg@10"] > popularity["ndcg@10"] + 0.4, results["methods"]
    assert model["hr@10"] > 0.8
    assert {"hr@20", "ndcg@20", "mrr", "coverage@10", "diversity@10"} <= set(model)
    text = (report / "report.md").read_text()
    assert "| popularity |" in text and "item co-occurrence" in text
    served = next(iter(results["breakdowns"]["target popularity (training occurrences)"].values()))
    assert all(low <= share <= high for share, low, high in (r["share_of_reference"] for r in served))
    assert "(95% interval) |" in text
    for plot in ("training.png", "by-length.png", "by-popularity.png"):
        assert (report / plot).stat().st_size > 1000
    assert "report:" in capsys.readouterr().out


def test_refit_trains_on_validation_targets_and_baselines_follow(tmp_path: Path) -> None:
    data = tmp_path / "events.csv"
    _sequential_csv(data, users=120)
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    flags = ["--d-model", "16", "--epochs", "3", "--patience", "1", "--max-len", "10", "--no-text"]
    assert main(["train", "--data", str(data), "--out", str(bundle), "--refit", *flags]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["config"]["refit"] is True
    assert main(["evaluate", "--data", str(data), "--bundle", str(bundle), "--report", str(report)]) == 0
    results = json.loads((report / "results.json").read_text())
    dataset = load_dataset(data, "generic")
    # The baselines were fitted on what the refit model saw: the validation targets count.
    refit_popularity = Popularity(dataset, refit=True)
    plain_popularity = Popularity(dataset)
    assert refit_popularity.counts.sum() == plain_popularity.counts.sum() + len(dataset.valid)
    assert "popularity" in {m["method"] for m in results["methods"]}


def test_new_items_are_held_out_of_training_and_ranked_cold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "events.csv"
    _sequential_csv(data, users=120)
    dataset = load_dataset(data, "generic")
    held_out = dataset.with_new_items(0.2)
    new = ~held_out.trained_items(refit=True)
    assert held_out.new_items == new.sum() == round(0.2 * dataset.n_items) and dataset.trained_items().all()
    assert not any(new[e.target] for e in held_out.valid) and len(held_out.test) == len(dataset.test)
    assert np.array_equal(~dataset.with_new_items(0.2).trained_items(), new)  # seeded

    bundle, report = tmp_path / "bundle", tmp_path / "report"
    flags = ["--d-model", "16", "--epochs", "3", "--patience", "1", "--max-len", "10", "--no-text"]
    assert main(["train", "--data", str(data), "--out", str(bundle), "--new-items", "0.2", *flags]) == 0
    blanks = [line == "" for line in (bundle / "item_ids.txt").read_text().splitlines()]
    assert blanks == new.tolist()
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), "--bundle", str(bundle), "--report", str(report)]) == 2
    assert "give evaluate the --new-items that train had" in capsys.readouterr().err
    flags = ["--bundle", str(bundle), "--report", str(report), "--new-items", "0.2"]
    assert main(["evaluate", "--data", str(data), *flags]) == 0
    model = json.loads((report / "results.json").read_text())["methods"][0]
    assert model["cold_users"] == sum(new[e.target] for e in dataset.test) > 0
    assert 1 <= model["cold_median_rank"] <= dataset.n_items


def test_id_only_model_scores_items_it_never_learned_as_zero(tmp_path: Path) -> None:
    file = tmp_path / "Tiny.txt"
    # Items 13 and 14 are only ever a validation or test target: an id-only model never learns them.
    file.write_text("".join(f"u{u} 10 11 12 {13 + u % 2} {14 - u % 2}\n" for u in range(6)))
    bundle = tmp_path / "bundle"
    flags = ["--d-model", "8", "--n-heads", "1", "--epochs", "1", "--max-len", "5"]
    assert main(["train", "--data", str(file), "--format", "s3rec", "--out", str(bundle), *flags]) == 0
    scorer = BundleScorer(bundle, load_dataset(file, "s3rec"), None)
    assert np.abs(scorer.item_vectors[:3]).sum(axis=1).min() > 0
    assert not scorer.item_vectors[3:].any()


def test_cli_data_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--data", str(tmp_path / "nope.csv"), "--bundle", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"rtrec: error: {tmp_path / 'nope.csv'} does not exist"
    data = tmp_path / "events.csv"
    _sequential_csv(data, users=10)
    assert main(["train", "--data", str(data), "--dropout", "1.5"]) == 2
    assert "dropout must be in [0, 1)" in capsys.readouterr().err


def test_a_share_of_a_baseline_comes_with_a_paired_interval_that_narrows_with_users() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.random(400)
    assert paired_ratio(baseline, baseline) == (1.0, 1.0, 1.0)  # paired: the same users, no spread
    better = baseline * 1.2 + rng.normal(0, 0.1, 400)
    share, low, high = paired_ratio(better, baseline)
    assert 1.0 < low < share < high
    more = np.tile(better, 16), np.tile(baseline, 16)
    _, low_more, high_more = paired_ratio(*more)
    assert high_more - low_more < (high - low) / 2
