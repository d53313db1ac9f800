"""Causal self-attention over a profile, shared by SASRec and ACF's order-aware variant.

A profile is (B, L) item slots, oldest first; PAD slots may sit anywhere (on the left in
training, nowhere when serving). Self-attention positions count real items from the oldest
(:func:`positions_forward`), as SASRec's count from the start of its window: slot t then has the
same position whether the profile ends at t or goes on after it, so a causal pass over a row
gives every prefix of it exactly what a pass over that prefix alone would (every-position
training). Notation: B profiles, L slots, D model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
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

    def weights(self, x: Tensor, blocked: Tensor) -> Tensor:
        """(B, L, L) the attention :meth:`forward` gives ``x``: row t, slot t's weights over
        the slots, averaged over heads."""
        h = self.norm_attention(x)
        _, weights = self.attention(h, h, h, attn_mask=blocked, need_weights=True)
        return weights


def causal_blocked(real: Tensor, heads: int) -> Tensor:
    """(B, L) True on real items -> (B·heads, L, L) True where slot t may not look at slot j:
    j after t, or j padding (a slot may always look at itself, so no row is empty)."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    allowed = causal & real.unsqueeze(1)  # (B, L, L): key j is an item at or before t
    allowed |= torch.eye(length, dtype=torch.bool, device=real.device)
    return (~allowed).repeat_interleave(heads, dim=0)


def positions_forward(mask: Tensor, size: int) -> Tensor:
    """(B, L) position of each real profile item counted from the oldest (0 = oldest), ignoring
    padding wherever it is; capped at ``size - 1``."""
    before = mask.long().cumsum(-1) - mask.long()  # real items older than this one
    return before.clamp(max=size - 1)


def positions_back(mask: Tensor, size: int) -> Tensor:
    """(B, L) position of each real profile item counted back from the newest (0 = newest),
    ignoring padding wherever it is; capped at ``size - 1``."""
    after = mask.flip(-1).cumsum(-1).flip(-1) - mask.long()  # real items newer than this one
    return after.clamp(max=size - 1)
