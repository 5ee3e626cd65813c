"""Export trained towers to an ONNX bundle, then prove parity with torch.

An interest-encoder bundle holds the user tower (``model.onnx``), the item tower
(``item_tower.onnx``), the item ids the model learned (``item_ids.txt``) and a
manifest with checksums. It is written to a staging folder and moved into place
only after both parity checks passed at shapes other than the traced one,
padded rows and a lone user included.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from encoder.config import (
    INTEREST_INPUTS,
    INTEREST_OUTPUT,
    ITEM_IDS_FILE,
    ITEM_INDEX_INPUT,
    ITEM_OUTPUT,
    ITEM_TEXT_INPUT,
    ITEM_TOWER_FILE,
    MODEL_FILE,
    MODEL_FP16_FILE,
    MODEL_INT8_FILE,
    OPSET,
    BundleManifest,
    InterestEncoderConfig,
    staged_bundle,
)
from encoder.features import EncoderInputs, WindowArrays, assemble_inputs
from encoder.model import InterestEncoder, ItemTower
from streams.errors import ModelError
from streams.fusion import ENCODER_ALONE, Fusion

PARITY_TOLERANCE = 1e-4  # max abs difference between torch and ONNX Runtime outputs (scores are unnormalised)
# Half precision keeps ~3 significant digits: its user vectors may differ from the float32 torch
# model's by this share of the largest output value.
FP16_RELATIVE_TOLERANCE = 5e-3
INT8_RELATIVE_TOLERANCE = 5e-2  # int8 weights: seen about 6e-3 of the largest output
PARITY_SHAPES = ((1, 1), (1, 50), (3, 7), (7, 50), (16, 23))  # (batch, longest window)
DYNAMIC_AXES = {"batch", "length", "items", "tokens"}


def random_inputs(cfg: InterestEncoderConfig, batch: int, length: int, seed: int) -> EncoderInputs:
    """Windows of varied lengths (so most rows are padded) with realistic event times."""
    rng = np.random.default_rng(seed)
    windows = []
    for row in range(batch):
        n = length if row == 0 else int(rng.integers(1, length + 1))
        vectors = (0.1 * rng.normal(size=(n, cfg.d_model))).astype(np.float32)
        ts = np.sort(rng.integers(1_700_000_000_000, 1_700_000_000_000 + 86_400_000, size=n))
        windows.append(WindowArrays(vectors, rng.integers(1, cfg.n_type_ids, size=n), ts))
    return assemble_inputs(windows, cfg.d_model, cfg.max_len)


def random_items(cfg: InterestEncoderConfig, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {ITEM_INDEX_INPUT[0]: rng.integers(0, cfg.n_items + 1, size=n).astype(np.int64)}
    if cfg.text_dim:
        text = rng.normal(size=(n, cfg.text_dim)).astype(np.float32)
        feed[ITEM_TEXT_INPUT[0]] = text / np.linalg.norm(text, axis=1, keepdims=True)
    return feed


def to_tensors(inputs: EncoderInputs) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in (inputs.item_vectors, inputs.event_types, inputs.ages_s, inputs.mask))


def item_tower_inputs(cfg: InterestEncoderConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    return dict([ITEM_INDEX_INPUT, ITEM_TEXT_INPUT] if cfg.text_dim else [ITEM_INDEX_INPUT])


class HalfPrecision(nn.Module):
    """The user tower computing in float16 behind the float32 contract: inputs are cast on the way
    in (ages only after the gap feature is taken) and the user vector on the way out."""

    def __init__(self, model: InterestEncoder) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(
        self, item_vectors: torch.Tensor, event_types: torch.Tensor, ages_s: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model(item_vectors.half(), event_types, ages_s, mask).float()


def check_user_parity(model: InterestEncoder, onnx_path: Path, provider: str = "cpu") -> tuple[float, float]:
    """The largest absolute difference from the float32 torch model, and the largest output value."""
    from encoder.runtime import make_session

    session = make_session(onnx_path, provider)
    worst, scale = 0.0, 0.0
    for seed, (batch, length) in enumerate(PARITY_SHAPES):
        inputs = random_inputs(model.cfg, batch, min(length, model.cfg.max_len), seed)
        with torch.no_grad():
            expected = model(*to_tensors(inputs)).numpy()
        got = session.run([INTEREST_OUTPUT], inputs.as_feed())[0]
        worst, scale = max(worst, float(np.abs(expected - got).max())), max(scale, float(np.abs(expected).max()))
        # A user alone must get the same vector as inside a padded batch.
        real = int(inputs.mask[0].sum())
        alone = EncoderInputs(
            *(a[:1, -real:] for a in (inputs.item_vectors, inputs.event_types, inputs.ages_s, inputs.mask))
        )
        worst = max(worst, float(np.abs(session.run([INTEREST_OUTPUT], alone.as_feed())[0] - expected[:1]).max()))
    return worst, scale


def export_half_precision(model: InterestEncoder, folder: Path) -> dict[str, Any]:
    """``model.fp16.onnx`` beside the float32 user tower, checked against the float32 torch model
    on CUDA when ONNX Runtime has it (where it is meant to run), else on CPU."""
    from encoder.runtime import cuda_available

    path = folder / MODEL_FP16_FILE
    export_onnx(
        HalfPrecision(model).eval(),
        to_tensors(random_inputs(model.cfg, 2, 5, 123)),
        path,
        INTEREST_INPUTS,
        INTEREST_OUTPUT,
    )
    provider = "cuda" if cuda_available() else "cpu"
    diff, scale = check_user_parity(model, path, provider)
    return _checked_parity("float16", diff, scale, FP16_RELATIVE_TOLERANCE, provider)


def export_int8(model: InterestEncoder, folder: Path) -> dict[str, Any]:
    """``model.int8.onnx``: the float32 user tower with its weights quantized to int8 (activations
    quantized on the fly), checked against the float32 torch model on CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = folder / MODEL_INT8_FILE
    # 7-bit weights: x86 CPUs without VNNI multiply uint8 activations by int8 weights in 16-bit pairs that
    # saturate at full range, and a bundle runs wherever it is deployed, not where it was exported. Seen on a
    # CPU with AVX but not AVX2: 5-15 % of the largest output off with 8-bit weights, 0.6-0.7 % with 7.
    quantize_dynamic(folder / MODEL_FILE, path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    diff, scale = check_user_parity(model, path)
    return _checked_parity("int8", diff, scale, INT8_RELATIVE_TOLERANCE, "cpu")


def _checked_parity(precision: str, diff: float, scale: float, tolerance: float, provider: str) -> dict[str, Any]:
    if diff > tolerance * scale:
        raise ModelError(
            f"the {precision} user tower differs from torch by {diff:.2e}, over {tolerance:.0e} of the "
            f"largest output ({scale:.2f})"
        )
    return {"max_abs_diff": diff, "max_abs_output": scale, "relative_tolerance": tolerance, "on": provider}


def check_item_parity(tower: ItemTower, onnx_path: Path) -> float:
    from encoder.runtime import make_session

    session = make_session(onnx_path, "cpu")
    worst = 0.0
    for seed, n in enumerate((1, 7, 300)):
        feed = random_items(tower.cfg, n, seed)
        with torch.no_grad():
            expected = tower(*(torch.from_numpy(a) for a in feed.values())).numpy()
        worst = max(worst, float(np.abs(session.run([ITEM_OUTPUT], feed)[0] - expected).max()))
    return worst


def export_onnx(
    model: nn.Module, sample: Sequence[torch.Tensor], path: Path, inputs: Mapping[str, Any], output: str
) -> None:
    """Export per a declared contract: the axes it names batch, length, items or tokens are dynamic."""
    dynamic = {
        name: {axis: torch.export.Dim.DYNAMIC for axis, label in enumerate(shape) if label in DYNAMIC_AXES}
        for name, (_dtype, shape) in inputs.items()
    }
    torch.onnx.export(
        model,
        tuple(sample),
        str(path),
        input_names=list(inputs),
        output_names=[output],
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def export_interest_encoder(
    model: InterestEncoder,
    item_ids: Sequence[str],
    bundle: Path,
    training: dict[str, Any],
    metrics: dict[str, Any],
    fp16: bool = False,
    int8: bool = False,
    fusion: Fusion = ENCODER_ALONE,
) -> BundleManifest:
    """``fp16`` adds ``model.fp16.onnx``, the user tower a CUDA worker runs by default; ``int8``
    adds ``model.int8.onnx``, run where RTREC_ENCODER_PRECISION=int8 asks for it."""
    model = model.cpu().eval()
    cfg = model.cfg
    if cfg.n_items not in (0, len(item_ids)):
        raise ModelError(f"the model learned {cfg.n_items} item ids, but {len(item_ids)} were given")
    with staged_bundle(bundle) as staging:
        export_onnx(
            model, to_tensors(random_inputs(cfg, 2, 5, 123)), staging / MODEL_FILE, INTEREST_INPUTS, INTEREST_OUTPUT
        )
        item_inputs = item_tower_inputs(cfg)
        sample_items = [torch.from_numpy(a) for a in random_items(cfg, 3, 123).values()]
        export_onnx(model.items, sample_items, staging / ITEM_TOWER_FILE, item_inputs, ITEM_OUTPUT)
        (staging / ITEM_IDS_FILE).write_text("".join(f"{i}\n" for i in item_ids))
        user_parity, item_parity = (
            check_user_parity(model, staging / MODEL_FILE)[0],
            check_item_parity(model.items, staging / ITEM_TOWER_FILE),
        )
        for name, diff in (("user", user_parity), ("item", item_parity)):
            if diff > PARITY_TOLERANCE:
                raise ModelError(
                    f"{name} tower ONNX output differs from torch by {diff:.2e} (> {PARITY_TOLERANCE:.0e})"
                )
        half = export_half_precision(model, staging) if fp16 else None
        quantized = export_int8(model, staging) if int8 else None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        manifest = BundleManifest(
            kind="interest-encoder",
            version=f"interest-{stamp}-{str(training.get('fingerprint', 'adhoc'))[:8]}",
            dim=cfg.d_model,
            opset=OPSET,
            inputs={k: list(v) for k, v in INTEREST_INPUTS.items()},
            output=INTEREST_OUTPUT,
            config=cfg.to_dict(),
            training=training,
            metrics=metrics,
            parity={
                "max_abs_diff": user_parity,
                "tolerance": PARITY_TOLERANCE,
                "shapes": [list(s) for s in PARITY_SHAPES],
                **({"fp16": half} if half else {}),
                **({"int8": quantized} if quantized else {}),
            },
            item_tower={
                "inputs": {k: list(v) for k, v in item_inputs.items()},
                "output": ITEM_OUTPUT,
                "parity": {"max_abs_diff": item_parity, "tolerance": PARITY_TOLERANCE},
                "items": len(item_ids),
            },
            fusion=fusion.to_dict() if fusion.active else {},
        )
        manifest.write(staging)
    return manifest
