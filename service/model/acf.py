"""Attentive Collaborative Filtering (Chen et al., SIGIR 2017) on image components.

Faithful to the VisRec tutorial's PyTorch reimplementation, with the paper's options it dropped
(the ``W1v v_l`` term, untied ``v``/``p``) available in :class:`ACFConfig`.

Notation (B users, L profile items, K components, C raw feature dim, D model dim, A attention dim):
- component attention ``b(i,l,m) = w2ᵀ ReLU(W2u u_i + W2x x_lm + b2) + c2``, softmax over K;
- item attention ``a(i,l) = w1ᵀ ReLU(W1u u_i + W1p p_l [+ W1v v_l] + W1x x̄_l + b1) + c1``,
  masked softmax over the profile;
- user vector ``u_i + Σ_l α(i,l) p_l``; score ``scale · (user · v_j) [+ b_j]``.

Everything that does not depend on the user (the reduced components ``x`` and their attention
keys ``W2x x + b2``) is computed once per catalogue in :meth:`ACF.encode_items`, so a batch of
users never touches raw C-dimensional features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD = 0  # item index 0 is padding; real items are 1..N
UNKNOWN_USER = -1  # user index of someone the model has no embedding for


@dataclass(frozen=True)
class ACFConfig:
    n_users: int
    n_items: int
    feature_dim: int
    n_components: int = 49
    dim: int = 64
    attention_dim: int = 64
    tied: bool = True  # v = p, as in the tutorial
    item_term: bool = False  # the paper's W1v v_l term in the item attention
    item_bias: bool = False
    component_pool: Literal["attention", "mean"] = "attention"  # "mean": ablation
    score_scale: float | None = None  # None: 1 / dim, as in the tutorial

    @property
    def scale(self) -> float:
        return 1.0 / self.dim if self.score_scale is None else self.score_scale


@dataclass(frozen=True)
class ItemTables:
    """Per-item, user-independent tensors; row 0 is the padding item."""

    reduced: Tensor  # (M, K, D) reduced components x
    keys: Tensor  # (M, K, A) W2x x + b2


@dataclass(frozen=True)
class Attended:
    user: Tensor  # (B, D) user vector
    item_attention: Tensor  # (B, L) sums to 1 over real profile items, 0 on padding
    component_attention: Tensor  # (B, L, K) sums to 1 per real profile item, 0 on padding


class ACF(nn.Module):
    """ACF with the item features held as a (non-persistent) buffer.

    ``features``: (N, K, C) raw component features of items 1..N, any float dtype.
    """

    features: Tensor  # (N+1, K, C) float32 buffer, row 0 = padding

    def __init__(self, config: ACFConfig, features: Tensor) -> None:
        super().__init__()
        n, k, c = features.shape
        if (n, k, c) != (config.n_items, config.n_components, config.feature_dim):
            raise ValueError(
                f"features have shape {(n, k, c)}, the model expects "
                f"{(config.n_items, config.n_components, config.feature_dim)}"
            )
        self.config = config
        d, a = config.dim, config.attention_dim
        padded = torch.cat([torch.zeros(1, k, c), features.float()])  # (N+1, K, C)
        self.register_buffer("features", padded, persistent=False)
        self.user_embedding = nn.Embedding(config.n_users, d)
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=PAD)  # v
        self.profile_embedding = (  # p
            self.item_embedding
            if config.tied
            else nn.Embedding(config.n_items + 1, d, padding_idx=PAD)
        )
        self.reduce = nn.Linear(c, d)
        self.comp_user = nn.Linear(d, a, bias=False)  # W2u
        self.comp_key = nn.Linear(d, a)  # W2x, b2
        self.comp_out = nn.Linear(a, 1)  # w2, c2
        self.item_user = nn.Linear(d, a, bias=False)  # W1u
        self.item_profile = nn.Linear(d, a)  # W1p, b1
        self.item_component = nn.Linear(d, a, bias=False)  # W1x
        self.item_self = nn.Linear(d, a, bias=False) if config.item_term else None  # W1v
        self.item_out = nn.Linear(a, 1)  # w1, c1
        self.bias = (
            nn.Embedding(config.n_items + 1, 1, padding_idx=PAD) if config.item_bias else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for emb in (self.item_embedding, self.profile_embedding):
                emb.weight[PAD].zero_()
            if self.bias is not None:
                self.bias.weight.zero_()

    # --- user-independent part -------------------------------------------------------------
    def encode_items(self, features: Tensor) -> ItemTables:
        """Raw features (M, K, C) -> reduced components and their attention keys."""
        x = self.reduce(features)  # (M, K, D)
        return ItemTables(reduced=x, keys=self.comp_key(x))

    def catalogue_tables(self) -> ItemTables:
        """Tables for the whole catalogue, row = item index (row 0 = padding)."""
        return self.encode_items(self.features)

    # --- user-dependent part ---------------------------------------------------------------
    def attend(
        self, users: Tensor, profiles: Tensor, tables: ItemTables, rows: Tensor | None = None
    ) -> Attended:
        """User vectors with both attentions.

        users (B,) (``UNKNOWN_USER`` allowed), profiles (B, L) item indices with PAD for empty
        slots; ``rows`` (B, L) are the rows of ``tables`` holding each profile item (default:
        the item index).
        """
        rows = profiles if rows is None else rows
        mask = profiles != PAD  # (B, L)
        u = self.user_vectors(users)  # (B, D)
        beta, x_bar = self._pool_components(users, u, tables, rows)  # (B, L, K), (B, L, D)
        p = self.profile_embedding(profiles)  # (B, L, D)
        h = self.item_user(u).unsqueeze(1) + self.item_profile(p) + self.item_component(x_bar)
        if self.item_self is not None:
            h = h + self.item_self(self.item_embedding(profiles))
        alpha = _masked_softmax(self.item_out(F.relu(h)).squeeze(-1), mask)  # (B, L)
        user = u + (alpha.unsqueeze(-2) @ p).squeeze(-2)  # (B, D)
        return Attended(user, alpha, beta * mask.unsqueeze(-1))

    def user_vectors(self, users: Tensor) -> Tensor:
        """(B,) user indices -> (B, D) embeddings; ``UNKNOWN_USER`` (a user the model was not
        trained on) gets a zero vector, so their vector comes from their profile alone."""
        known = users != UNKNOWN_USER
        u = self.user_embedding(users.clamp(min=0))
        return u * known.unsqueeze(-1)

    def _pool_components(
        self, users: Tensor, u: Tensor, tables: ItemTables, rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Component attention and pooled components ``x̄`` of every profile slot.

        Both depend only on the (user, item) pair, so each distinct pair in the batch is
        computed once: when a batch holds consecutive samples of a user, whose profiles are
        sliding windows over the same items, this is several times less work than per slot.
        Returns beta (B, L, K) and x̄ (B, L, D).
        """
        b, l_ = rows.shape
        pair_keys = (users[:, None] + 1) * len(tables.reduced) + rows  # (B, L); users >= -1
        _, inverse = torch.unique(pair_keys, return_inverse=True)  # (B, L) -> 0..P-1
        slots = torch.arange(b * l_, device=rows.device)
        first = torch.full((int(inverse.max()) + 1,), b * l_, device=rows.device)
        first = first.scatter_reduce(0, inverse.flatten(), slots, reduce="amin")  # (P,)
        pair_rows, pair_u = rows.flatten()[first], u[first // l_]  # (P,), (P, D)
        x = tables.reduced.index_select(0, pair_rows)  # (P, K, D)
        if self.config.component_pool == "mean":
            beta = x.new_full(x.shape[:2], 1.0 / x.shape[1])  # (P, K)
        else:
            query = self.comp_user(pair_u)[:, None, :]  # (P, 1, A)
            keys = tables.keys.index_select(0, pair_rows)  # (P, K, A)
            beta = torch.softmax(self.comp_out(F.relu(keys + query)).squeeze(-1), dim=-1)
        x_bar = (beta.unsqueeze(1) @ x).squeeze(1)  # (P, D)
        slot_pairs = inverse.flatten()  # index_select: its backward is a fast index_add
        return (
            beta.index_select(0, slot_pairs).view(b, l_, -1),
            x_bar.index_select(0, slot_pairs).view(b, l_, -1),
        )

    # --- scoring ---------------------------------------------------------------------------
    def item_vectors(self) -> Tensor:
        """(N, D[+1]) so that ``query_vectors(user) @ item_vectors().T`` is the model's score."""
        v = self.item_embedding.weight[1:] * self.config.scale
        if self.bias is None:
            return v
        return torch.cat([v, self.bias.weight[1:]], dim=1)

    def query_vectors(self, user: Tensor) -> Tensor:
        """(B, D) user vectors -> (B, D[+1]) inner-product queries."""
        if self.bias is None:
            return user
        return torch.cat([user, user.new_ones(len(user), 1)], dim=1)

    def score_items(self, user: Tensor, items: Tensor) -> Tensor:
        """user (B, D), items (B,) -> (B,)."""
        s = (user * self.item_embedding(items)).sum(-1) * self.config.scale
        return s if self.bias is None else s + self.bias(items).squeeze(-1)

    def forward(
        self, users: Tensor, profiles: Tensor, pos: Tensor, neg: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Training scores of (B,) positives and negatives for users with (B, L) profiles."""
        user = self.attend(users, profiles, self.catalogue_tables()).user
        return self.score_items(user, pos), self.score_items(user, neg)

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        """(B, N) scores of items 1..N."""
        user = self.attend(users, profiles, self.catalogue_tables()).user
        return self.query_vectors(user) @ self.item_vectors().T


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; all-masked rows give zeros (no NaN)."""
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1) * mask
