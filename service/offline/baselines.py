"""Baselines trained and evaluated in the same harness as ACF.

Every model here has the ACF interface used by training and evaluation:
``forward(users, profiles, pos, neg) -> (pos_scores, neg_scores)`` and
``score_all(users, profiles) -> (B, N)`` over items 1..N. Baselines ignore the profile.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from service.model.acf import PAD


class Popularity(nn.Module):
    """Scores every item by its number of training interactions."""

    counts: Tensor  # (N,)

    def __init__(self, train_items: np.ndarray, n_items: int) -> None:
        super().__init__()
        counts = np.bincount(train_items, minlength=n_items + 1)[1:].astype(np.float32)
        self.register_buffer("counts", torch.from_numpy(counts))

    def forward(
        self, users: Tensor, profiles: Tensor, pos: Tensor, neg: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.counts[pos - 1], self.counts[neg - 1]

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.counts.expand(len(users), -1)


class BPRMF(nn.Module):
    """Matrix factorisation with an item bias (Rendle et al., 2009); no images."""

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=PAD)
        self.bias = nn.Embedding(n_items + 1, 1, padding_idx=PAD)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.1)
        nn.init.zeros_(self.bias.weight)

    def _score(self, users: Tensor, items: Tensor) -> Tensor:
        return (self.user(users) * self.item(items)).sum(-1) + self.bias(items).squeeze(-1)

    def forward(
        self, users: Tensor, profiles: Tensor, pos: Tensor, neg: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self._score(users, pos), self._score(users, neg)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.user(users) @ self.item.weight[1:].T + self.bias.weight[1:].T


class VBPR(nn.Module):
    """VBPR (He & McAuley, 2016) on globally average-pooled image features.

    ``features``: (N, K, C) component features of items 1..N; they are pooled over K and scaled
    so that their mean L2 norm is 1 (raw CNN activations are in the tens, which would swamp the
    collaborative part at initialisation).
    """

    visual: Tensor  # (N+1, C), row 0 = padding

    def __init__(self, n_users: int, features: Tensor, dim: int) -> None:
        super().__init__()
        pooled = features.float().mean(dim=1)  # (N, C)
        pooled = pooled / pooled.norm(dim=1).mean().clamp_min(1e-12)
        self.register_buffer("visual", torch.cat([torch.zeros(1, pooled.shape[1]), pooled]))
        half = max(dim // 2, 1)
        n_items = len(pooled)
        self.gamma_user = nn.Embedding(n_users, half)
        self.gamma_item = nn.Embedding(n_items + 1, half, padding_idx=PAD)
        self.theta_user = nn.Embedding(n_users, half)
        self.embed = nn.Linear(pooled.shape[1], half, bias=False)  # E
        self.visual_bias = nn.Linear(pooled.shape[1], 1, bias=False)  # β'
        self.bias = nn.Embedding(n_items + 1, 1, padding_idx=PAD)
        for emb in (self.gamma_user, self.gamma_item, self.theta_user):
            nn.init.normal_(emb.weight, std=0.1)
        nn.init.zeros_(self.bias.weight)

    def _item_parts(self, items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = self.visual[items]
        bias = self.bias(items).squeeze(-1) + self.visual_bias(f).squeeze(-1)
        return self.gamma_item(items), self.embed(f), bias

    def _score(self, users: Tensor, items: Tensor) -> Tensor:
        gamma, visual, bias = self._item_parts(items)
        return (
            (self.gamma_user(users) * gamma).sum(-1)
            + (self.theta_user(users) * visual).sum(-1)
            + bias
        )

    def forward(
        self, users: Tensor, profiles: Tensor, pos: Tensor, neg: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self._score(users, pos), self._score(users, neg)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        items = torch.arange(1, len(self.visual), device=self.visual.device)
        gamma, visual, bias = self._item_parts(items)
        return self.gamma_user(users) @ gamma.T + self.theta_user(users) @ visual.T + bias
