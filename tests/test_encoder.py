"""Encoders: the shared featurizer, the model, training that learns, and ONNX parity with torch."""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.build import train_and_export
from encoder.config import INTEREST_BUNDLE, ITEM_IDS_FILE, TEXT_BUNDLE, InterestEncoderConfig
from encoder.data import Dataset, Example, History, leave_one_out
from encoder.export import (
    FP16_RELATIVE_TOLERANCE,
    INT8_RELATIVE_TOLERANCE,
    PARITY_TOLERANCE,
    export_interest_encoder,
    random_inputs,
    to_tensors,
)
from encoder.features import EventTypeVocabulary, WindowArrays, assemble_inputs
from encoder.model import InterestEncoder
from encoder.ranking_metrics import summarize
from encoder.runtime import OnnxInterestEncoder, OnnxItemEncoder, OnnxTextEmbedder
from encoder.train import (
    CatalogueTensors,
    TrainingResult,
    freed_memory_kept,
    history_scores,
    rank_examples,
    train_interest_encoder,
)
from streams.cli import main
from streams.errors import ModelError
from streams.ports import SearchHit
from streams.records import EVENT_TYPES
from streams.rerank import merge_interests
from streams.tools.stream_model import catalogue_walks, workload_dataset, workload_histories
from streams.tools.workload import Workload, WorkloadConfig

TINY = InterestEncoderConfig(
    event_types=EVENT_TYPES, n_items=40, text_dim=16, d_model=16, n_heads=2, max_len=12, epochs=15, patience=15,
    learning_rate=5e-3, dropout=0.1, id_dropout=0.3, seed=3,
)  # fmt: skip


def test_windows_are_left_padded_with_ages_from_the_newest_event() -> None:
    vectors = np.eye(4, dtype=np.float32)
    short = WindowArrays(vectors[:2], np.array([1, 2]), np.array([1_000, 61_000]))
    long = WindowArrays(vectors, np.array([1, 1, 1, 3]), np.array([0, 1_000, 2_000, 3_000]))
    inputs = assemble_inputs([short, long], item_dim=4)
    assert inputs.mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert inputs.ages_s[0].tolist() == [0.0, 0.0, 60.0, 0.0]
    assert inputs.event_types[0].tolist() == [0, 0, 1, 2]
    np.testing.assert_array_equal(inputs.item_vectors[0, 2:], vectors[:2])
    trimmed = assemble_inputs([long], item_dim=4, max_len=2)
    assert trimmed.ages_s.tolist() == [[1.0, 0.0]]


def test_unknown_event_types_map_to_their_own_id() -> None:
    vocabulary = EventTypeVocabulary(["view", "click"])
    assert vocabulary.ids(["click", "view", "wishlist"]).tolist() == [2, 1, 3]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        InterestEncoderConfig(event_types=EVENT_TYPES, n_items=5, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="ids"):
        InterestEncoderConfig(event_types=EVENT_TYPES)
    with pytest.raises(ValueError, match="loss"):
        InterestEncoderConfig(event_types=EVENT_TYPES, n_items=5, loss="bpr")
    with pytest.raises(ValueError, match="tail_adjustment"):
        InterestEncoderConfig(event_types=EVENT_TYPES, n_items=5, tail_adjustment=-0.5)
    with pytest.raises(ValueError, match="fusion_guard"):
        InterestEncoderConfig(event_types=EVENT_TYPES, n_items=5, fusion_guard=1.5)


def test_model_stays_finite_for_fully_padded_rows() -> None:
    model = InterestEncoder(TINY).eval()
    inputs = random_inputs(TINY, batch=4, length=6, seed=0)
    tensors = list(to_tensors(inputs))
    tensors[3] = torch.zeros_like(tensors[3])
    with torch.no_grad():
        assert torch.isfinite(model(*tensors)).all()


@pytest.mark.parametrize("interests", [1, 2])
def test_encoder_is_causal_every_position_sees_only_its_past(interests: int) -> None:
    """Training scores every position at once; that is only honest if no position sees the future."""
    model = InterestEncoder(dataclasses.replace(TINY, interests=interests)).eval()
    inputs = random_inputs(TINY, batch=1, length=8, seed=1)
    tensors = to_tensors(inputs)
    with torch.no_grad():
        full = model.interest_states(*tensors)  # [1, 8, K, d]
        for n in range(1, 9):
            prefix = model(*(t[:, :n] for t in tensors))
            # Ages count from the newest event; the encoder reads only their differences.
            torch.testing.assert_close(
                prefix, full[:, n - 1] if interests > 1 else full[:, n - 1, 0], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("interests", [1, 2])
def test_serving_the_newest_position_alone_matches_the_full_pass(interests: int) -> None:
    """``forward`` skips what only earlier positions need; padded rows of a batch must not notice."""
    model = InterestEncoder(dataclasses.replace(TINY, interests=interests)).eval()
    tensors = to_tensors(random_inputs(TINY, batch=6, length=10, seed=2))
    with torch.no_grad():
        full = model.interest_states(*tensors)[:, -1]
        torch.testing.assert_close(model(*tensors), full if interests > 1 else full[:, 0], atol=1e-5, rtol=0)


def _clustered_data(seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """40 items in 4 clusters; each user walks one cluster in order, so the next item is predictable."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16))
    text = np.repeat(centers, 10, axis=0) + 0.3 * rng.normal(size=(40, 16))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    histories = {}
    for user in range(150):
        cluster, start = rng.integers(4), rng.integers(10)
        items = cluster * 10 + (start + np.arange(12)) % 10
        histories[str(user)] = History(items.astype(np.int64), ["view"] * 12, np.arange(12, dtype=np.int64) * 60_000)
    return leave_one_out("clusters", [f"i{i}" for i in range(40)], histories, [f"t{i}" for i in range(40)], True), text


@pytest.fixture(scope="module")
def trained() -> tuple[Dataset, np.ndarray, TrainingResult]:
    data, text = _clustered_data()
    return data, text, train_interest_encoder(data, TINY, text)


def test_training_learns_next_item_structure(trained: tuple[Dataset, np.ndarray, TrainingResult]) -> None:
    data, text, result = trained
    untrained = InterestEncoder(TINY)
    catalogue = CatalogueTensors(data, text, torch.device("cpu"))
    vocabulary = EventTypeVocabulary(TINY.event_types)
    before = summarize(rank_examples(untrained, catalogue, data.valid, vocabulary, torch.device("cpu")))
    assert result.metrics["val_hr@10"] > 0.9  # each user's next item is the next in its cluster
    assert result.metrics["val_ndcg@10"] > before["ndcg@10"] + 0.3
    assert result.metrics["val_mrr"] > 0.7


def test_training_is_reproducible() -> None:
    data, text = _clustered_data()
    cfg = dataclasses.replace(TINY, epochs=2)
    first, second = train_interest_encoder(data, cfg, text), train_interest_encoder(data, cfg, text)
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]
    assert first.metrics == second.metrics


def test_sampled_softmax_trains_too() -> None:
    data, text = _clustered_data()
    result = train_interest_encoder(data, dataclasses.replace(TINY, loss="sampled", negatives=16), text)
    assert result.metrics["val_hr@10"] > 0.8


def test_logit_adjustment_takes_popularity_out_of_the_scores() -> None:
    """Next items drawn from a skewed popularity and nothing else: trained plainly, the scores learn the
    popularity (rare items buried); with the log shares added in training (1: the balanced softmax),
    the scores no longer follow it."""
    rng = np.random.default_rng(0)
    share = 1.0 / np.arange(1, 41) ** 1.2
    histories = {
        str(u): History(rng.choice(40, size=12, p=share / share.sum()), ["view"] * 12, np.arange(12) * 60_000)
        for u in range(300)
    }
    data = leave_one_out("skewed", [f"i{i}" for i in range(40)], histories)
    cfg = dataclasses.replace(TINY, text_dim=0, id_dropout=0.0, epochs=10, patience=10)
    popularity = np.log(data.occurrences())

    def popularity_in_scores(tail_adjustment: float) -> float:
        model = train_interest_encoder(data, dataclasses.replace(cfg, tail_adjustment=tail_adjustment)).model
        catalogue = CatalogueTensors(data, None, torch.device("cpu"))
        with torch.no_grad():
            scores = history_scores(
                model, catalogue.all_items(model), catalogue, data.train[:100], EventTypeVocabulary(cfg.event_types),
                torch.device("cpu"),
            )  # fmt: skip
        return float(np.corrcoef(scores.mean(axis=0), popularity)[0, 1])

    plain, balanced = popularity_in_scores(0.0), popularity_in_scores(1.0)
    assert plain > 0.9 and abs(balanced) < 0.5


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_training_keeps_freed_memory_instead_of_faulting_it_in_again() -> None:
    def faults_of_a_second_large_array() -> int:
        np.ones(25_000_000)  # 200 MB, freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        np.ones(25_000_000)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    outside = faults_of_a_second_large_array()
    with freed_memory_kept():
        inside = faults_of_a_second_large_array()
    assert outside > 50 and inside < outside / 10
    assert faults_of_a_second_large_array() > 50  # glibc's own policy again afterwards


def test_both_towers_onnx_match_torch(tmp_path: Path, trained: tuple[Dataset, np.ndarray, TrainingResult]) -> None:
    data, text, result = trained
    manifest = export_interest_encoder(result.model, data.item_ids, tmp_path / "bundle", {"fingerprint": "t"}, {})
    assert manifest.parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert manifest.item_tower["parity"]["max_abs_diff"] <= PARITY_TOLERANCE
    users = OnnxInterestEncoder(tmp_path / "bundle", provider="cpu")
    items = OnnxItemEncoder(tmp_path / "bundle", provider="cpu")
    assert users.provider == "CPUExecutionProvider" and items.reads_text
    for batch, length in ((1, 1), (5, 8), (9, 12)):  # shapes other than the exported sample (2 × 5)
        inputs = random_inputs(TINY, batch, length, seed=batch)
        with torch.no_grad():
            expected = result.model(*to_tensors(inputs)).numpy()
        np.testing.assert_allclose(users.encode_batch(inputs), expected, atol=PARITY_TOLERANCE, rtol=0)
    # Known ids keep their learned embedding; an unknown id is placed by its text alone.
    got = items.encode_batch(["i3", "brand-new"], text[[3, 3]])
    with torch.no_grad():
        tower = result.model.items
        known = tower(torch.tensor([4]), torch.from_numpy(text[[3]])).numpy()
        text_only = tower(torch.tensor([0]), torch.from_numpy(text[[3]])).numpy()
    np.testing.assert_allclose(got, np.concatenate([known, text_only]), atol=PARITY_TOLERANCE, rtol=0)


def test_a_windows_vector_is_bit_identical_whatever_it_is_batched_with(tmp_path: Path) -> None:
    # The stream's shape (64 wide, 50 events): there, one call over a whole batch changed about a third
    # of the vectors in their last bits, depending on the batch, so a replay could reorder near ties.
    cfg = InterestEncoderConfig(event_types=EVENT_TYPES, n_items=30, d_model=64, n_heads=2, max_len=50, seed=1)
    export_interest_encoder(InterestEncoder(cfg), [f"i{n}" for n in range(30)], tmp_path, {"fingerprint": "t"}, {})
    users = OnnxInterestEncoder(tmp_path, provider="cpu", intra_op_threads=1)
    rng = np.random.default_rng(2)
    windows = []
    for _ in range(60):
        n = int(rng.integers(1, 51))
        ts = np.sort(rng.integers(1_700_000_000_000, 1_700_000_000_000 + 86_400_000, size=n))
        windows.append(WindowArrays(rng.normal(size=(n, 64)).astype(np.float32), rng.integers(1, 9, size=n), ts))
    together = users.encode_batch(assemble_inputs(windows, 64, 50))
    order = rng.permutation(60)
    shuffled = users.encode_batch(assemble_inputs([windows[n] for n in order], 64, 50))
    alone = [users.encode_batch(assemble_inputs([w], 64, 50))[0] for w in windows[:5]]
    np.testing.assert_array_equal(shuffled[np.argsort(order)], together)
    np.testing.assert_array_equal(np.stack(alone), together[:5])


def _two_interest_data(seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """The 4 clusters of ``_clustered_data``; each user alternates between two of them, walking each in order."""
    rng = np.random.default_rng(seed)
    _, text = _clustered_data(seed)
    histories = {}
    for user in range(300):
        first, second = rng.choice(4, size=2, replace=False)
        start = rng.integers(10, size=2)
        steps = np.arange(6)
        walk = np.stack([first * 10 + (start[0] + steps) % 10, second * 10 + (start[1] + steps) % 10], axis=1)
        histories[str(user)] = History(walk.reshape(-1).astype(np.int64), ["view"] * 12, np.arange(12) * 60_000)
    items, texts = [f"i{i}" for i in range(40)], [f"t{i}" for i in range(40)]
    return leave_one_out("two interests", items, histories, texts, True), text


def _shown_both(examples: list[Example], users: np.ndarray, item_vectors: np.ndarray) -> int:
    """How many users' merged lists (``users`` [n, interests, d]) show ≥ 3 items of each cluster they walk."""
    both = 0
    for example, vectors in zip(examples, users, strict=True):
        seen = set(example.history.items.tolist())
        per_interest = [
            [SearchHit(str(i), float(scores[i]), {}) for i in np.argsort(-scores) if i not in seen]
            for scores in vectors @ item_vectors.T
        ]
        shown = [int(h.id) // 10 for h in merge_interests(per_interest, 10)]
        both += all(shown.count(c) >= 3 for c in set((example.history.items // 10).tolist()))
    return both


def test_a_model_of_two_interests_predicts_better_and_shows_users_both(tmp_path: Path) -> None:
    data, text = _two_interest_data()
    examples = data.test[:100]
    results, shown = {}, {}
    for k in (1, 2):
        cfg = dataclasses.replace(TINY, interests=k, epochs=40, patience=40)
        results[k] = train_interest_encoder(data, cfg, text)
        bundle = tmp_path / f"bundle-{k}"
        export_interest_encoder(results[k].model, data.item_ids, bundle, {"fingerprint": "t"}, {})
        users = OnnxInterestEncoder(bundle, provider="cpu")
        inputs = random_inputs(cfg, 5, 8, seed=5)
        with torch.no_grad():
            expected = results[k].model(*to_tensors(inputs)).numpy()
        got = users.encode_batch(inputs)
        assert users.interests == k and got.shape == ((5, 2, cfg.d_model) if k == 2 else (5, cfg.d_model))
        np.testing.assert_allclose(got, expected, atol=PARITY_TOLERANCE, rtol=0)
        item_vectors = OnnxItemEncoder(bundle, provider="cpu").encode_batch(data.item_ids, text)
        vocabulary = EventTypeVocabulary(cfg.event_types)
        windows = [
            WindowArrays(item_vectors[e.history.items], vocabulary.ids(list(e.history.types)), e.history.ts_ms)
            for e in examples
        ]
        vectors = users.encode_batch(assemble_inputs(windows, cfg.d_model, cfg.max_len))
        shown[k] = _shown_both(examples, vectors if k == 2 else vectors[:, None], item_vectors)
    # Seen: HR@10 0.90 with two interests, 0.55 with one vector; 33 of 100 users shown both clusters, 0.
    assert results[2].metrics["val_hr@10"] >= results[1].metrics["val_hr@10"] + 0.2, results
    assert shown[2] >= 15 and shown[1] <= 2, shown


def test_float16_and_int8_user_towers_are_exported_within_tolerance_and_chosen_only_where_asked(
    tmp_path: Path, trained: tuple[Dataset, np.ndarray, TrainingResult], capsys: pytest.CaptureFixture[str]
) -> None:
    data, _, result = trained
    bundle = tmp_path / "bundle"
    manifest = export_interest_encoder(
        result.model, data.item_ids, bundle, {"fingerprint": "t"}, {}, fp16=True, int8=True
    )
    half, quantized = manifest.parity["fp16"], manifest.parity["int8"]
    assert 0 < half["max_abs_diff"] <= FP16_RELATIVE_TOLERANCE * half["max_abs_output"]
    assert 0 < quantized["max_abs_diff"] <= INT8_RELATIVE_TOLERANCE * quantized["max_abs_output"]
    assert {"model.fp16.onnx", "model.int8.onnx"} <= set(manifest.files)
    automatic = OnnxInterestEncoder(bundle, provider="cpu")
    forced = OnnxInterestEncoder(bundle, provider="cpu", precision="fp16")
    assert (automatic.precision, forced.precision) == ("fp32", "fp16")  # on a CPU, auto keeps float32
    assert OnnxInterestEncoder(bundle, provider="cpu", precision="int8").precision == "int8"
    # How each precision's vectors stand to the model's: tests/test_encoder_runtime.py.
    # The encoder benchmark measures what this machine has: here, CPU float32 and int8.
    assert main(["bench-encoder", "--bundle", str(bundle), "--batches", "1,4", "--seconds", "0.01"]) == 0
    table = capsys.readouterr().out
    assert "user vectors/s" in table and "CPU      fp32" in table and "CPU      int8" in table
    assert main(["bench-encoder", "--batches", "1,x"]) == 2
    plain = tmp_path / "plain"
    export_interest_encoder(result.model, data.item_ids, plain, {"fingerprint": "t"}, {})
    with pytest.raises(ModelError, match="no fp16 user tower"):
        OnnxInterestEncoder(plain, provider="cpu", precision="fp16")
    with pytest.raises(ModelError, match="no int8 user tower"):
        OnnxInterestEncoder(plain, provider="cpu", precision="int8")


def test_id_only_bundle_refuses_items_it_never_learned(tmp_path: Path) -> None:
    data, _ = _clustered_data()
    cfg = dataclasses.replace(TINY, text_dim=0, id_dropout=0.0, epochs=1)
    result = train_interest_encoder(data, cfg)
    export_interest_encoder(result.model, data.item_ids, tmp_path / "bundle", {"fingerprint": "t"}, {})
    items = OnnxItemEncoder(tmp_path / "bundle", provider="cpu")
    assert not items.reads_text and items.encode_batch(["i1", "i2"]).shape == (2, TINY.d_model)
    with pytest.raises(ModelError, match="unknown to an id-only model"):
        items.encode_batch(["i1", "brand-new"])


def test_bundle_checksums_are_verified(tmp_path: Path, trained: tuple[Dataset, np.ndarray, TrainingResult]) -> None:
    data, _, result = trained
    bundle = tmp_path / "bundle"
    export_interest_encoder(result.model, data.item_ids, bundle, {"fingerprint": "test"}, result.metrics)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == "interest-encoder" and manifest["config"]["event_types"] == list(EVENT_TYPES)
    with (bundle / "item_tower.onnx").open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(ModelError, match="does not match its checksum"):
        OnnxItemEncoder(bundle, provider="cpu")


def test_text_encoder_onnx_matches_torch_and_sentence_transformers(models_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from encoder.text import SentenceEncoder, pretrained_path

    embedder = OnnxTextEmbedder(models_dir / TEXT_BUNDLE, provider="cpu")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome", "tea " * 400]
    got = embedder.embed_batch(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(pretrained_path()))
    model = SentenceEncoder(AutoModel.from_pretrained(str(pretrained_path()), attn_implementation="eager")).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        expected = model(encoded["input_ids"], encoded["attention_mask"]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # The published all-MiniLM-L6-v2 similarity of this pair (sentence-transformers' own example).
    assert float(got[0] @ got[1]) == pytest.approx(0.755, abs=0.01)
    assert float(got[0] @ got[1]) > float(got[0] @ got[2])


def test_session_bundles_exist_with_manifests(models_dir: Path) -> None:
    interest = OnnxInterestEncoder(models_dir / INTEREST_BUNDLE, provider="auto")
    assert interest.dim == 64 and interest.version.startswith("interest-")
    assert interest.manifest.parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert interest.manifest.config["text_dim"] == 384 and interest.manifest.config["n_items"] > 0
    assert interest.manifest.metrics["val_hr@10"] > 0.5  # users follow a few categories; chance is ~0.04


def test_stream_code_never_imports_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, streams\n"
        "names = [m.name for m in pkgutil.walk_packages(streams.__path__, 'streams.')]\n"
        "assert 'streams.worker.agents' in names and 'streams.stores.edge' in names, names\n"
        "for name in names:\n"
        "    if not name.endswith('__main__'):\n"
        "        importlib.import_module(name)\n"
        "import encoder.runtime, encoder.features, encoder.build\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_failed_export_leaves_the_previous_bundle_in_place(tmp_path: Path) -> None:
    from encoder.config import staged_bundle

    bundle = tmp_path / "bundle"
    with staged_bundle(bundle) as staging:
        (staging / "model.onnx").write_text("v1")
    with pytest.raises(ModelError), staged_bundle(bundle) as staging:
        (staging / "model.onnx").write_text("v2, half written")
        raise ModelError("parity check failed")
    assert (bundle / "model.onnx").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left behind


def test_items_never_in_training_are_exported_and_scored_as_unseen(tmp_path: Path) -> None:
    """An item only ever seen as a held-out target has no learned id: training and serving place it by text,
    and training never pushes it down as a negative (an item published after training would not be there)."""
    data, text = _clustered_data()
    cold = data.item_ids.index("i39")
    histories = {
        str(u): History(np.append(h.items[h.items != cold], cold), ["view"] * (len(h.items[h.items != cold]) + 1),
                        np.arange(len(h.items[h.items != cold]) + 1, dtype=np.int64) * 60_000)
        for u, h in enumerate(data.train[:40])
    }  # fmt: skip
    dataset = leave_one_out("cold", data.item_ids, histories, data.item_texts, True)
    assert not dataset.trained_items()[cold]
    catalogue = CatalogueTensors(dataset, text, torch.device("cpu"))
    assert int(catalogue.index[cold]) == 0 and int(catalogue.index[cold - 1]) == cold
    # Nor is it a negative of the training softmax: whatever its vector, the loss is the same.
    states, targets = torch.randn(2, 3, 1, TINY.d_model), torch.tensor([[0, 1, -1], [2, 3, 38]])
    vectors = torch.randn(len(data.item_ids), TINY.d_model)
    moved = vectors.clone()
    moved[cold] = states[0, 0, 0] * 100.0
    assert torch.equal(
        catalogue.routed_loss(states, targets, vectors, TINY), catalogue.routed_loss(states, targets, moved, TINY)
    )
    # Candidate id dropout: in training, a share of the candidates is placed by text alone, as the cold item is.
    model = InterestEncoder(dataclasses.replace(TINY, n_items=len(data.item_ids), text_dim=text.shape[1]))
    with torch.no_grad():
        text_only = model.items(torch.zeros(len(data.item_ids), dtype=torch.long), torch.from_numpy(text))
        dropped = catalogue.all_items(model.train(), 0.5)
        placed_by_text = torch.isclose(dropped, text_only).all(dim=1)
        assert placed_by_text[cold] and 0.3 < placed_by_text.float().mean() < 0.7
        assert torch.equal(catalogue.all_items(model.eval(), 0.5), catalogue.all_items(model))

    train_and_export(dataset, dataclasses.replace(TINY, epochs=1), tmp_path / "bundle", text, "t", lambda _m: None)
    lines = (tmp_path / "bundle" / ITEM_IDS_FILE).read_text().splitlines()
    assert lines[cold] == "" and lines[cold - 1] == "i38"
    items = OnnxItemEncoder(tmp_path / "bundle", provider="cpu")
    assert items.knows("i38") and not items.knows("i39")
    np.testing.assert_allclose(
        items.encode_batch(["i39"], text[[cold]]), items.encode_batch(["brand-new"], text[[cold]]), atol=1e-6
    )


def test_catalogue_walks_leave_no_item_cold() -> None:
    workload = Workload(WorkloadConfig(n_items=50, n_users=5, seed=3))
    histories = workload_histories(workload, 3, 6) + catalogue_walks(workload, 6)
    assert workload_dataset(workload, histories).trained_items().all()
