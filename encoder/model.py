"""The interest encoder: a small time-aware transformer over a user's window.

Inputs follow the ONNX contract in ``encoder.config`` (left-padded, newest event
last). The output is one L2-normalised user vector in the item (text) space, so
a nearest-neighbour search over item vectors ranks the catalogue, brand-new
items included. Attention is written by hand with a finite mask: it exports
cleanly with dynamic batch and length and stays finite for padded rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from encoder.config import InterestEncoderConfig

MASK_VALUE = -1e4  # finite, so that a fully padded row never produces NaN


class SelfAttention(nn.Module):
    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        # x [B, L, d]; key_bias [B, 1, 1, L] (0 for real keys, MASK_VALUE for padding)
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # q, k, v [B, H, L, hd]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + key_bias  # [B, H, L, L]
        weights = self.dropout(scores.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b, length, d)  # [B, L, d]
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_bias))
        return x + self.dropout(self.ffn(self.norm2(x)))


class InterestEncoder(nn.Module):
    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_proj = nn.Linear(cfg.item_dim, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.n_type_ids, cfg.d_model, padding_idx=0)
        # Time features: log-minutes since the event and since the previous event.
        self.time_proj = nn.Linear(2, cfg.d_model)
        self.recency_emb = nn.Embedding(cfg.max_len, cfg.d_model)  # distance from the newest event
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.item_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        item_vectors: torch.Tensor,  # [B, L, item_dim]
        event_types: torch.Tensor,  # [B, L] int64
        ages_s: torch.Tensor,  # [B, L] float32
        mask: torch.Tensor,  # [B, L] bool
    ) -> torch.Tensor:  # [B, item_dim], L2-normalised
        length = item_vectors.shape[1]
        gaps = torch.cat([torch.zeros_like(ages_s[:, :1]), ages_s[:, :-1] - ages_s[:, 1:]], dim=1).clamp(min=0.0)
        time_features = torch.stack([torch.log1p(ages_s / 60.0), torch.log1p(gaps / 60.0)], dim=-1)  # [B, L, 2]
        recency = (length - 1 - torch.arange(length, device=item_vectors.device)).clamp(max=self.cfg.max_len - 1)
        x = (
            self.item_proj(item_vectors)
            + self.type_emb(event_types)
            + self.time_proj(time_features)
            + self.recency_emb(recency)[None]
        )  # [B, L, d]
        x = self.dropout(x) * mask[..., None].to(x.dtype)
        key_bias = (~mask).to(x.dtype)[:, None, None, :] * MASK_VALUE  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, key_bias)
        newest = self.norm(x[:, -1])  # [B, d]
        return F.normalize(self.out(newest), dim=-1)
