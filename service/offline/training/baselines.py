"""Baselines trained and evaluated in the same harness as ACF.

Every model here scores with ``score_all(users, profiles) -> (B, N)`` over items 1..N. The
trained ones are inner-product models, ``queries(users, profiles) -> (B, D')`` against
``item_vectors(items) -> (M, D')``, which is all the training losses need. The fitted ones
(popularity, transitions, EASE) have a closed form and nothing to train.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.counts.expand(len(users), -1)


class Transitions(nn.Module):
    """The order-aware counter: what follows what, with no training at all.

    For every training sequence, item ``i`` followed by item ``j`` within ``window`` positions
    adds ``1/distance`` to ``T[i, j]``; rows are normalised to sum to 1. A user's scores are the
    mean of the rows of their profile items weighted by ``decay`` per step back from the newest,
    plus ``popularity_weight`` times each item's share of training interactions. ``T`` is
    sparse, so memory grows with the pairs seen, not with N².
    """

    transitions_t: Tensor  # (N+1, N+1) sparse, T transposed
    share: Tensor  # (N,)

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        n_items: int,
        *,
        window: int,
        decay: float,
        popularity_weight: float,
    ) -> None:
        super().__init__()
        src, dst, weight = [], [], []
        for s in sequences:
            for d in range(1, min(window, len(s) - 1) + 1):
                src.append(s[:-d])
                dst.append(s[d:])
                weight.append(np.full(len(s) - d, 1.0 / d))
        size = (n_items + 1, n_items + 1)
        if src:
            pairs = torch.as_tensor(np.stack([np.concatenate(dst), np.concatenate(src)]))
            values = torch.as_tensor(np.concatenate(weight), dtype=torch.float32)
            t = torch.sparse_coo_tensor(
                pairs, values, size, check_invariants=True
            ).coalesce()  # sums
            row_sums = torch.zeros(size[0]).index_add_(0, t.indices()[1], t.values())
            t = torch.sparse_coo_tensor(
                t.indices(), t.values() / row_sums[t.indices()[1]], size, check_invariants=True
            ).coalesce()
        else:
            empty = torch.zeros(2, 0, dtype=torch.long)
            t = torch.sparse_coo_tensor(empty, [], size, check_invariants=True)
        self.register_buffer("transitions_t", t)
        counts = np.bincount(
            np.concatenate(list(sequences) or [np.zeros(0, int)]), minlength=size[0]
        )
        self.register_buffer("share", torch.as_tensor(counts[1:] / max(counts.sum(), 1)).float())
        self.decay = decay
        self.popularity_weight = popularity_weight

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        length = profiles.shape[1]
        steps_back = torch.arange(length - 1, -1, -1, device=profiles.device)
        w = (self.decay**steps_back).float() * (profiles != PAD)  # (B, L)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        mixed = torch.zeros(len(profiles), self.transitions_t.shape[0], device=profiles.device)
        mixed.scatter_add_(1, profiles, w)  # (B, N+1) weight of each profile item
        mixed[:, PAD] = 0
        scores = torch.sparse.mm(self.transitions_t, mixed.T).T  # (B, N+1)
        return scores[:, 1:] + self.popularity_weight * self.share


class EASE(nn.Module):
    """EASE (Steck, 2019): an item-item model with a closed form, ``B = I - P diag(1/diag(P))``
    with ``P = (XᵀX + λI)⁻¹``, zero diagonal. A user's scores are their training row times
    ``B`` (all their training items, not only the profile: that is the model).

    N x N weights in float64 during the solve: for catalogues of tens of thousands of items
    at most.
    """

    history: Tensor  # (U, N) float32, 1 where the user has a training interaction
    weights: Tensor  # (N, N)

    def __init__(
        self,
        train_users: np.ndarray,
        train_items: np.ndarray,
        n_users: int,
        n_items: int,
        *,
        l2: float,
    ) -> None:
        super().__init__()
        if n_items > 30_000:
            raise ValueError(f"EASE needs an N x N inverse; {n_items} items is too many")
        x = torch.zeros(n_users, n_items)
        x[torch.as_tensor(train_users), torch.as_tensor(train_items) - 1] = 1.0
        gram = (x.T @ x).double() + l2 * torch.eye(n_items, dtype=torch.float64)
        p = torch.linalg.inv(gram)
        b = -p / torch.diagonal(p)  # column j divided by P_jj
        b.fill_diagonal_(0.0)
        self.register_buffer("history", x)
        self.register_buffer("weights", b.float())

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.history[users] @ self.weights


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

    def queries(self, users: Tensor, profiles: Tensor) -> Tensor:
        u = self.user(users)
        return torch.cat([u, u.new_ones(len(u), 1)], dim=1)  # (B, D+1)

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        if items is None:
            return torch.cat([self.item.weight[1:], self.bias.weight[1:]], dim=1)
        return torch.cat([self.item(items), self.bias(items)], dim=1)  # (M, D+1)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.queries(users, profiles) @ self.item_vectors().T


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

    def queries(self, users: Tensor, profiles: Tensor) -> Tensor:
        g, t = self.gamma_user(users), self.theta_user(users)
        return torch.cat([g, t, g.new_ones(len(g), 1)], dim=1)  # (B, 2·D/2 + 1)

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        if items is None:
            items = torch.arange(1, len(self.visual), device=self.visual.device)
        f = self.visual[items]
        bias = self.bias(items) + self.visual_bias(f)  # (M, 1)
        return torch.cat([self.gamma_item(items), self.embed(f), bias], dim=1)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        return self.queries(users, profiles) @ self.item_vectors().T
