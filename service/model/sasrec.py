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
import typing
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.model.acf import PAD
from service.model.blocks import Block, causal_blocked, positions_forward


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    max_len: int = 9
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=PAD)
        self.position = nn.Embedding(config.max_len, d)  # counted from the oldest item
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.dropout) for _ in range(config.blocks)
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
        return self._encode(profiles, weights=False)[0]

    def newest_attention(self, profiles: Tensor) -> Tensor:
        """(B, L') what the query reads: the last block's attention of the newest position
        over the profile (averaged over heads; 0 on padding), for ``/explain``."""
        weights = self._encode(profiles, weights=True)[1]
        assert weights is not None
        return weights[:, -1]

    def _encode(self, profiles: Tensor, *, weights: bool) -> tuple[Tensor, Tensor | None]:
        profiles = profiles[:, -self.config.max_len :]
        real = profiles != PAD  # (B, L')
        position = self.position(positions_forward(real, self.config.max_len))
        x = self.item_embedding(profiles) * math.sqrt(self.config.dim) + position
        x = self.dropout(x) * real.unsqueeze(-1)  # (B, L', D)
        blocked = causal_blocked(real, self.config.heads)  # (B·heads, L', L')
        last = x  # the last block's input
        for block in self.blocks:
            last, x = x, block(x, blocked) * real.unsqueeze(-1)
        if not weights:
            return self.norm(x), None
        if not self.blocks:  # each position's state is its own item's
            return self.norm(x), torch.eye(real.shape[1], device=x.device).expand(len(x), -1, -1)
        return self.norm(x), typing.cast(Block, self.blocks[-1]).weights(last, blocked)

    def queries(self, users: Tensor, profiles: Tensor) -> Tensor:
        """(B, D): the hidden state at the newest position (users are not used)."""
        return self.encode(profiles)[:, -1]

    def queries_every_position(self, users: Tensor, rows: Tensor) -> Tensor:
        """(B, L) consecutive items -> (B, L, D): position t's query is :meth:`queries` of
        ``rows[:, :t+1]``, all from one causal pass (positions count from the oldest item)."""
        return self.encode(rows)

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        """(M, D) output vectors of ``items`` (default: 1..N), shared with the input."""
        return self.item_embedding.weight[1:] if items is None else self.item_embedding(items)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.queries(users, profiles) @ self.item_vectors().T
