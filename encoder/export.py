"""Export a trained interest encoder to an ONNX bundle, then prove parity with torch.

The bundle (model.onnx + manifest.json) is written to a staging folder and
moved into place only after the parity check passed at batch and window sizes
other than the traced one, padded rows and a lone user included.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder.config import INTEREST_INPUTS, INTEREST_OUTPUT, MODEL_FILE, OPSET, BundleManifest, staged_bundle
from encoder.features import EncoderInputs, WindowArrays, assemble_inputs
from encoder.model import InterestEncoder
from encoder.train import to_tensors
from streams.errors import ModelError

PARITY_TOLERANCE = 1e-5  # max abs difference between torch and ONNX Runtime user vectors
PARITY_SHAPES = ((1, 1), (1, 50), (3, 7), (7, 50), (16, 23))  # (batch, longest window)


def random_inputs(model: InterestEncoder, batch: int, length: int, seed: int) -> EncoderInputs:
    """Windows of varied lengths (so most rows are padded) with realistic event times."""
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    windows = []
    for row in range(batch):
        n = length if row == 0 else int(rng.integers(1, length + 1))
        vectors = rng.normal(size=(n, cfg.item_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ts = np.sort(rng.integers(1_700_000_000_000, 1_700_000_000_000 + 86_400_000, size=n))
        windows.append(WindowArrays(vectors, rng.integers(1, cfg.n_type_ids, size=n), ts))
    return assemble_inputs(windows, cfg.item_dim, cfg.max_len)


def check_parity(model: InterestEncoder, onnx_path: Path, provider: str = "cpu") -> dict[str, Any]:
    from encoder.runtime import make_session

    session = make_session(onnx_path, provider)
    worst = 0.0
    model.eval()
    for seed, (batch, length) in enumerate(PARITY_SHAPES):
        inputs = random_inputs(model, batch, length, seed)
        with torch.no_grad():
            expected = model(*to_tensors(inputs, torch.device("cpu"))).numpy()
        got = session.run([INTEREST_OUTPUT], inputs.as_feed())[0]
        worst = max(worst, float(np.abs(expected - got).max()))
        # A user alone must get the same vector as inside a padded batch.
        alone = EncoderInputs(
            *(
                a[:1, -int(inputs.mask[0].sum()) :]
                for a in (inputs.item_vectors, inputs.event_types, inputs.ages_s, inputs.mask)
            )
        )
        worst = max(worst, float(np.abs(session.run([INTEREST_OUTPUT], alone.as_feed())[0] - expected[:1]).max()))
    return {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "shapes": [list(s) for s in PARITY_SHAPES]}


def export_onnx(
    model: torch.nn.Module, sample: tuple[torch.Tensor, ...], path: Path, inputs: Mapping[str, Any], output: str
) -> None:
    """Export per a declared contract: every input dynamic in batch and length, weights inline."""
    torch.onnx.export(
        model,
        sample,
        str(path),
        input_names=list(inputs),
        output_names=[output],
        dynamic_shapes={name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in inputs},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def export_interest_encoder(
    model: InterestEncoder,
    bundle: Path,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> BundleManifest:
    model = model.cpu().eval()
    with staged_bundle(bundle) as staging:
        sample = random_inputs(model, 2, 5, seed=123)
        export_onnx(
            model, to_tensors(sample, torch.device("cpu")), staging / MODEL_FILE, INTEREST_INPUTS, INTEREST_OUTPUT
        )
        parity = check_parity(model, staging / MODEL_FILE)
        if parity["max_abs_diff"] > PARITY_TOLERANCE:
            raise ModelError(
                f"interest encoder ONNX output differs from torch by {parity['max_abs_diff']:.2e} "
                f"(> {PARITY_TOLERANCE:.0e})"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        manifest = BundleManifest(
            kind="interest-encoder",
            version=f"interest-{stamp}-{training.get('fingerprint', 'adhoc')[:8]}",
            dim=model.cfg.item_dim,
            opset=OPSET,
            inputs={k: list(v) for k, v in INTEREST_INPUTS.items()},
            output=INTEREST_OUTPUT,
            config=model.cfg.to_dict(),
            training=training,
            metrics=metrics,
            parity=parity,
        )
        manifest.write(staging)
    return manifest
