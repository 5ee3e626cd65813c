"""The two towers: item vectors from ids and text, user vectors from a window of events.

The item tower maps a catalogue item to the model's item space: a learned id
embedding (collaborative signal) plus a projection of its text vector (so a
brand-new item, whose id the model never saw, is placed by its text alone).
Either part may be absent: id-only data sets have no text, and an unseen item
has index 0, whose embedding is fixed at zero.

The interest encoder is a causal transformer over the window's item vectors,
event types and gaps between events. Trained on every position of a sequence
at once (each position predicts the next item), served on the newest position:
its output is the user vector, scored against item vectors by dot product,
which is what the vector store ranks by. A model of several interests
(``interests`` > 1) gives each position as many user vectors: its own state and
standing interests that learned queries pool from the states seen so far. In
training the position's state learns every target, and each target also trains the
standing interest closest to it (hard routing, as in ComiRec), so each specialises. Inputs follow the ONNX contract in
``encoder.config`` (left-padded, newest event last). Attention is written by
hand with a finite mask so it exports with dynamic batch and length and stays
finite for padded rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from encoder.config import InterestEncoderConfig

MASK_VALUE = -1e4  # finite, so that a fully padded row never produces NaN


class Dropout(nn.Module):
    """Inverted dropout from a uniform draw: on CPU it is about 3× faster than ``nn.Dropout``'s
    Bernoulli sampling, which otherwise dominates a training step of this small model."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


class ItemTower(nn.Module):
    """item index (0 = unseen) and optional text vector → item vector [dim]."""

    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.id_embedding = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=0) if cfg.n_items else None
        self.text_proj = (
            nn.Sequential(nn.Linear(cfg.text_dim, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
            if cfg.text_dim
            else None
        )
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.02)
            with torch.no_grad():
                self.id_embedding.weight[0].zero_()

    def forward(self, item_index: torch.Tensor, text_vectors: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros((*item_index.shape, self.cfg.d_model), device=item_index.device)
        if self.id_embedding is not None:
            out = out + self.id_embedding(item_index)
        if self.text_proj is not None:
            if text_vectors is None:
                raise ValueError("this item tower needs text vectors")
            out = out + self.text_proj(text_vectors)
        return out


class SelfAttention(nn.Module):
    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        # x [B, L, d]; bias [B, 1, L, L]: 0 where a query may see a key, MASK_VALUE elsewhere.
        # queries: only the newest positions ask (→ [B, queries, d]); every position is still a key.
        b, length, d = x.shape
        asking = length if queries is None else queries
        if queries is None:
            q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            weight, bias_qkv = self.qkv.weight, self.qkv.bias
            q = nn.functional.linear(x[:, -queries:], weight[:d], bias_qkv[:d])
            q = q.view(b, queries, self.n_heads, self.head_dim).transpose(1, 2)
            k, v = (
                nn.functional.linear(x, weight[d:], bias_qkv[d:])
                .view(b, length, 2, self.n_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4)
            )
            bias = bias[:, :, -queries:]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias  # [B, H, asking, L]
        weights = self.dropout(scores.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b, asking, d)
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
            Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model),
        )
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        # queries: the output only for the newest positions, [B, queries, d]
        attended = self.attn(self.norm1(x), bias, queries)
        x = (x if queries is None else x[:, -queries:]) + self.dropout(attended)
        return x + self.dropout(self.ffn(self.norm2(x)))


class InterestHeads(nn.Module):
    """Hidden states [B, L, d] → interests [B, L, K, d]: at each position, the position's own state
    (the current intent, what a one-vector model serves) and K - 1 standing interests, each pooled
    by a learned query attending over the states up to it.

    Measured before choosing: K pooled interests alone lost two thirds of the accuracy on the
    generated workload (NDCG@10 0.21 against 0.70); K pooled interests each added to the position's
    state came out alike (no user of two clusters was shown both); the state plus pooled ones keeps
    the accuracy (0.69) and, trained as above, learns a second interest the data really has.
    """

    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.keys = nn.Linear(cfg.d_model, cfg.d_model)
        self.queries = nn.Parameter(torch.randn(cfg.interests - 1, cfg.d_model) * 0.02)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, hidden: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        # visible [B, L(query), L(key)]: the keys each position may pool (itself and earlier, not padding)
        scores = torch.einsum("kd,bjd->bkj", self.queries, torch.tanh(self.keys(hidden)))  # [B, K - 1, L(key)]
        bias = (~visible).to(hidden.dtype)[:, None] * MASK_VALUE  # [B, 1, L, L]
        weights = (scores[:, :, None, :] + bias).softmax(dim=-1)  # [B, K - 1, L(query), L(key)]
        pooled = weights @ hidden[:, None]  # [B, K - 1, L, d]
        return torch.cat([hidden[:, :, None, :], self.out(pooled).transpose(1, 2)], dim=2)


class InterestEncoder(nn.Module):
    """Window → user vectors at every position (``interest_states``); ``forward`` serves the newest."""

    def __init__(self, cfg: InterestEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemTower(cfg)
        self.type_emb = nn.Embedding(cfg.n_type_ids, cfg.d_model, padding_idx=0)
        # log-minutes since the previous event: the same for every later position, so training
        # every position at once sees exactly what serving the newest one sees.
        self.gap_proj = nn.Linear(1, cfg.d_model)
        self.position_emb = nn.Embedding(cfg.max_len, cfg.d_model)  # events before this one in the window
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.heads = InterestHeads(cfg) if cfg.interests > 1 else None

    def interest_states(
        self, item_vectors: torch.Tensor, event_types: torch.Tensor, ages_s: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:  # [B, L, K, d]
        hidden, visible = self._encode(item_vectors, event_types, ages_s, mask)
        return hidden[:, :, None, :] if self.heads is None else self.heads(hidden, visible)

    def _encode(
        self,
        item_vectors: torch.Tensor,  # [B, L, d]
        event_types: torch.Tensor,  # [B, L] int64
        ages_s: torch.Tensor,  # [B, L] float32, seconds before the newest event
        mask: torch.Tensor,  # [B, L] bool
        newest_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # hidden states [B, L, d], what each position sees [B, L, L]
        """With ``newest_only`` the last block computes only the newest position ([B, 1, d] out): every
        position is still a key there, but no later block needs the others' outputs."""
        length = item_vectors.shape[1]
        gaps = torch.cat([torch.zeros_like(ages_s[:, :1]), ages_s[:, :-1] - ages_s[:, 1:]], dim=1).clamp(min=0.0)
        gap_features = torch.log1p(gaps / 60.0) * mask.to(gaps.dtype)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0, max=self.cfg.max_len - 1)
        x = (
            item_vectors * math.sqrt(self.cfg.d_model)
            + self.type_emb(event_types)
            # Ages stay float32 (in half precision they overflow after 18 hours); only the feature is cast.
            + self.gap_proj(gap_features[..., None].to(item_vectors.dtype))
            + self.position_emb(positions)
        )
        x = self.dropout(x) * mask[..., None].to(x.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        visible = causal[None] & mask[:, None, :]  # [B, L(query), L(key)]
        bias = (~visible).to(x.dtype)[:, None] * MASK_VALUE
        last = len(self.blocks) - 1
        for n, block in enumerate(self.blocks):
            x = block(x, bias, 1 if newest_only and n == last else None)
        return self.norm(x), visible

    def forward(
        self, item_vectors: torch.Tensor, event_types: torch.Tensor, ages_s: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:  # [B, d], or [B, K, d] with several interests
        # Serving reads the newest position only, so the rest of the last block is skipped (its share of a
        # 2-layer pass). Standing interests pool every position's final state, so they need the full pass.
        if self.heads is None:
            return self._encode(item_vectors, event_types, ages_s, mask, newest_only=True)[0][:, -1]
        return self.interest_states(item_vectors, event_types, ages_s, mask)[:, -1]


def score_all(user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
    """Dot-product scores, the vector store's ranking: [..., d] × [n_items, d] → [..., n_items]."""
    return user_vectors @ item_vectors.T


def user_scores(users: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
    """Each user's score of every item: [B, n_items]; a user of several interests scores by the closest."""
    scores = score_all(users, item_vectors)
    return scores if users.dim() == 2 else scores.amax(dim=1)


def routed(
    states: torch.Tensor, targets: torch.Tensor, item_vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user vector each target trains, and the targets: positions without one (-1) dropped, and of
    several interests the one scoring the target highest (hard routing: the choice takes no gradient)."""
    keep = targets >= 0
    states, targets = states[keep], targets[keep]  # [N, K, d], [N]
    if states.shape[1] == 1:
        return states[:, 0], targets
    with torch.no_grad():
        choice = (states * item_vectors[targets][:, None]).sum(-1).argmax(dim=1)
    return states[torch.arange(len(targets), device=states.device), choice], targets
