"""Encoders: the shared featurizer, the model, training that learns, and ONNX parity with torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.config import INTEREST_BUNDLE, TEXT_BUNDLE, InterestEncoderConfig
from encoder.data import History, TrainingData
from encoder.export import PARITY_TOLERANCE, export_interest_encoder, random_inputs
from encoder.features import EventTypeVocabulary, WindowArrays, assemble_inputs
from encoder.model import InterestEncoder
from encoder.runtime import OnnxInterestEncoder, OnnxTextEmbedder
from encoder.train import evaluate, to_tensors, train_interest_encoder
from streams.errors import ModelError
from streams.records import EVENT_TYPES

TINY = InterestEncoderConfig(
    event_types=EVENT_TYPES, item_dim=16, d_model=16, n_heads=2, epochs=10, window=8, learning_rate=5e-3, seed=3
)


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
        InterestEncoderConfig(event_types=EVENT_TYPES, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="window"):
        InterestEncoderConfig(event_types=EVENT_TYPES, window=500)


def test_model_outputs_unit_vectors_and_stays_finite_for_padded_rows() -> None:
    model = InterestEncoder(TINY).eval()
    inputs = random_inputs(model, batch=4, length=6, seed=0)
    padded = np.zeros_like(inputs.mask)
    tensors = list(to_tensors(inputs, torch.device("cpu")))
    tensors[3] = torch.from_numpy(padded)
    with torch.no_grad():
        out = model(*tensors)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        normal = model(*to_tensors(inputs, torch.device("cpu")))
    torch.testing.assert_close(normal.norm(dim=-1), torch.ones(4))


def _clustered_data(seed: int = 0) -> TrainingData:
    """Items in 4 clusters; each user stays in one cluster, so the next item is predictable."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16))
    vectors = np.repeat(centers, 10, axis=0) + 0.3 * rng.normal(size=(40, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    histories = []
    for _ in range(120):
        cluster = rng.integers(4)
        items = cluster * 10 + rng.integers(0, 10, size=12)
        histories.append(History(items.astype(np.int64), ["view"] * 12, np.arange(12, dtype=np.int64) * 60_000))
    return TrainingData([f"i{i}" for i in range(40)], vectors, histories)


def test_training_learns_next_item_structure() -> None:
    data = _clustered_data()
    result = train_interest_encoder(data, TINY)
    untrained = InterestEncoder(TINY).eval()
    from encoder.train import WindowBatcher, split_examples

    _, valid = split_examples(data)
    items = torch.nn.functional.normalize(torch.from_numpy(data.item_vectors), dim=-1)
    baseline = evaluate(untrained, WindowBatcher(data, TINY), valid, items, torch.device("cpu"))
    assert result.metrics["val_loss"] < baseline["val_loss"] - 0.3
    assert result.metrics["hr@10"] > baseline["hr@10"] + 0.1
    assert result.metrics["hr@10"] > 0.9  # the cluster holds 10 of the 40 items


def test_interest_encoder_onnx_matches_torch(tmp_path: Path) -> None:
    data = _clustered_data()
    result = train_interest_encoder(data, TINY)
    manifest = export_interest_encoder(result.model, tmp_path / "bundle", {"fingerprint": "test"}, result.metrics)
    assert manifest.parity["max_abs_diff"] <= PARITY_TOLERANCE
    runtime = OnnxInterestEncoder(tmp_path / "bundle", provider="cpu")
    assert runtime.provider == "CPUExecutionProvider"
    for batch, length in ((1, 1), (5, 8), (9, 33)):  # shapes other than the exported sample (2 × 5)
        inputs = random_inputs(result.model, batch, length, seed=batch)
        with torch.no_grad():
            expected = result.model(*to_tensors(inputs, torch.device("cpu"))).numpy()
        np.testing.assert_allclose(runtime.encode_batch(inputs), expected, atol=PARITY_TOLERANCE, rtol=0)


def test_bundle_checksums_are_verified(tmp_path: Path) -> None:
    result = train_interest_encoder(_clustered_data(), TINY)
    bundle = tmp_path / "bundle"
    export_interest_encoder(result.model, bundle, {"fingerprint": "test"}, result.metrics)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == "interest-encoder" and manifest["config"]["event_types"] == list(EVENT_TYPES)
    with (bundle / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(ModelError, match="does not match its checksum"):
        OnnxInterestEncoder(bundle, provider="cpu")


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
    assert interest.dim == 384 and interest.version.startswith("interest-")
    assert interest.manifest.parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert interest.manifest.metrics["hr@10"] > 0.2


def test_stream_code_never_imports_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, streams\n"
        "for m in pkgutil.iter_modules(streams.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('streams.' + m.name)\n"
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
