"""One contract suite for the encoder runtimes the worker is wired with (``streams.ports``): the
interest encoder's user tower at every precision this machine can run (float32, int8 and float16 on
the CPU; float32 and float16 on CUDA where it exists), and the item tower, against the torch model they
were exported from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.config import InterestEncoderConfig
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
from encoder.runtime import OnnxInterestEncoder, OnnxItemEncoder, cuda_available
from streams.ports import InterestEncoderRuntime, ItemEncoderRuntime
from streams.records import EVENT_TYPES

CONFIG = InterestEncoderConfig(
    event_types=EVENT_TYPES, n_items=30, text_dim=16, d_model=32, n_heads=2, max_len=20, dropout=0.0, seed=4
)
ITEM_IDS = [f"i{n}" for n in range(30)]
# How far a precision's user vectors may stand from the float32 torch model's: absolute for float32,
# a share of the largest output for the others.
TOLERANCE = {"fp32": PARITY_TOLERANCE, "fp16": FP16_RELATIVE_TOLERANCE, "int8": INT8_RELATIVE_TOLERANCE}
NEEDS_CUDA = pytest.mark.skipif(not cuda_available(), reason="no CUDA here")
RUNTIMES = [
    ("cpu", "fp32"),
    ("cpu", "int8"),
    ("cpu", "fp16"),  # runs, with casts, where a GPU worker's bundle is checked on a CPU
    pytest.param(("cuda", "fp16"), marks=NEEDS_CUDA),
    pytest.param(("cuda", "fp32"), marks=NEEDS_CUDA),
]


@pytest.fixture(scope="module")
def model() -> InterestEncoder:
    torch.manual_seed(CONFIG.seed)
    return InterestEncoder(CONFIG).eval()  # untrained weights: the contract is about the runtime, not learning


@pytest.fixture(scope="module")
def bundle(model: InterestEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("runtime") / "bundle"
    export_interest_encoder(model, ITEM_IDS, folder, {"fingerprint": "contract"}, {}, fp16=True, int8=True)
    return folder


@pytest.fixture(params=RUNTIMES, ids=lambda p: "-".join(p))
def runtime(request: pytest.FixtureRequest, bundle: Path) -> OnnxInterestEncoder:
    provider, precision = request.param
    return OnnxInterestEncoder(bundle, provider=provider, precision=precision, intra_op_threads=1)


def _expected(model: InterestEncoder, batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = random_inputs(CONFIG, batch, length, seed=seed)
    with torch.no_grad():
        return model(*to_tensors(inputs)).numpy(), inputs


def _allowed(runtime: OnnxInterestEncoder, expected: np.ndarray) -> float:
    share = TOLERANCE[runtime.precision]
    return share if runtime.precision == "fp32" else share * float(np.abs(expected).max())


def test_a_user_tower_declares_what_the_stream_reads(runtime: OnnxInterestEncoder) -> None:
    declared: InterestEncoderRuntime = runtime  # the Protocol the worker is wired with
    assert (declared.dim, declared.max_len, declared.interests) == (CONFIG.d_model, CONFIG.max_len, 1)
    assert declared.version.startswith("interest-") and declared.provider
    assert declared.precision == runtime.precision
    assert isinstance(declared.vocabulary, EventTypeVocabulary)
    assert declared.vocabulary.ids(["click", "never-seen"]).tolist()[1] == CONFIG.n_type_ids - 1


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (5, 8), (9, 20)])
def test_user_vectors_match_the_torch_model(
    runtime: OnnxInterestEncoder, model: InterestEncoder, batch: int, length: int
) -> None:
    expected, inputs = _expected(model, batch, length, seed=batch)
    got = runtime.encode_batch(inputs)
    assert got.dtype == np.float32 and got.shape == (batch, CONFIG.d_model)
    np.testing.assert_allclose(got, expected, atol=_allowed(runtime, expected), rtol=0)


def test_a_windows_vector_does_not_depend_on_its_batch(runtime: OnnxInterestEncoder) -> None:
    rng = np.random.default_rng(7)
    windows = []
    for _ in range(12):
        n = int(rng.integers(1, CONFIG.max_len + 1))
        ts = np.sort(rng.integers(1_700_000_000_000, 1_700_000_000_000 + 86_400_000, size=n))
        windows.append(WindowArrays(rng.normal(size=(n, CONFIG.d_model)).astype(np.float32), rng.integers(1, 9, n), ts))
    together = runtime.encode_batch(assemble_inputs(windows, CONFIG.d_model, CONFIG.max_len))
    alone = np.stack([runtime.encode_batch(assemble_inputs([w], CONFIG.d_model, CONFIG.max_len))[0] for w in windows])
    # int8 towers quantize activations with ranges taken per call, so their batch moves them within the
    # precision's tolerance; float towers agree to rounding.
    np.testing.assert_allclose(
        alone, together, atol=1e-5 if runtime.precision != "int8" else _allowed(runtime, together)
    )


def test_ages_beyond_half_precisions_range_stay_finite(runtime: OnnxInterestEncoder) -> None:
    inputs = random_inputs(CONFIG, 4, 20, seed=11)
    inputs = dataclasses.replace(inputs, ages_s=inputs.ages_s * 1_000)  # ages of up to ~3 years, past 65,504
    assert np.isfinite(runtime.encode_batch(inputs)).all()


@pytest.mark.parametrize("provider", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_an_item_tower_places_known_ids_by_their_embedding_and_new_items_by_text(
    provider: str, bundle: Path, model: InterestEncoder
) -> None:
    items: ItemEncoderRuntime = OnnxItemEncoder(bundle, provider=provider)
    assert (items.dim, items.text_dim, items.reads_text) == (CONFIG.d_model, CONFIG.text_dim, True)
    assert items.knows("i3") and not items.knows("brand-new")
    text = np.random.default_rng(3).normal(size=(2, CONFIG.text_dim)).astype(np.float32)
    got = items.encode_batch(["i3", "brand-new"], text)
    with torch.no_grad():
        known = model.items(torch.tensor([4]), torch.from_numpy(text[[0]])).numpy()  # id 3 is row 4: 0 is unseen
        text_only = model.items(torch.tensor([0]), torch.from_numpy(text[[1]])).numpy()
    assert got.dtype == np.float32 and got.shape == (2, CONFIG.d_model)
    np.testing.assert_allclose(got, np.concatenate([known, text_only]), atol=PARITY_TOLERANCE, rtol=0)
