"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's last items.

The strongest thing a user of this project would pick instead of ACF, so it is trained and
evaluated in the same harness: full-softmax cross-entropy over the catalogue (the "SASRec with
CE loss" of Klenitskiy & Vasilev, 2023, and Petrov & Macdonald, 2023), the same profiles (the
last ``max_len`` items, oldest first, PAD on the left) and the same early stopping on
validation. Item embeddings are shared between input and output, as in the paper.

Notation: B users, L profile positions, D model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.model.acf import PAD


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    max_len: int = 9
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2


class _Block(nn.Module):
    """Pre-norm transformer block: masked self-attention, then a position-wise feed-forward."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, blocked: Tensor) -> Tensor:
        """x (B, L, D); blocked (B·heads, L, L) True where a position may not look."""
        h = self.norm_attention(x)
        attended, _ = self.attention(h, h, h, attn_mask=blocked, need_weights=False)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.norm_ff(x)))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=PAD)
        self.position = nn.Embedding(config.max_len, d)  # counted back from the newest item
        self.blocks = nn.ModuleList(
            _Block(d, config.heads, config.dropout) for _ in range(config.blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.item_embedding.weight, std=d**-0.5)
        nn.init.normal_(self.position.weight, std=d**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[PAD].zero_()

    def encode(self, profiles: Tensor) -> Tensor:
        """(B, L) item indices, oldest first, PAD on the left -> (B, L', D) hidden states,
        L' = min(L, max_len); position t sees only positions <= t that hold an item."""
        profiles = profiles[:, -self.config.max_len :]
        length = profiles.shape[1]
        real = profiles != PAD  # (B, L')
        back = torch.arange(length - 1, -1, -1, device=profiles.device)  # newest = 0
        x = self.item_embedding(profiles) * math.sqrt(self.config.dim) + self.position(back)
        x = self.dropout(x) * real.unsqueeze(-1)  # (B, L', D)
        causal = torch.ones(length, length, dtype=torch.bool, device=profiles.device).tril()
        allowed = causal & real.unsqueeze(1)  # (B, L', L'): key j is an item at or before t
        allowed |= torch.eye(length, dtype=torch.bool, device=profiles.device)  # never empty
        blocked = (~allowed).repeat_interleave(self.config.heads, dim=0)  # (B·heads, L', L')
        for block in self.blocks:
            x = block(x, blocked) * real.unsqueeze(-1)
        return self.norm(x)

    def queries(self, users: Tensor, profiles: Tensor) -> Tensor:
        """(B, D): the hidden state at the newest position (users are not used)."""
        return self.encode(profiles)[:, -1]

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        """(M, D) output vectors of ``items`` (default: 1..N), shared with the input."""
        return self.item_embedding.weight[1:] if items is None else self.item_embedding(items)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.queries(users, profiles) @ self.item_vectors().T
