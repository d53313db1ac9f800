"""How one batch becomes a loss: the full or sampled softmax (logQ-corrected) and the VisRec
tutorial's pairwise losses, over any inner-product model; ACF and SASRec are trained on every
position of a sequence at once."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.model.acf import ACF, PAD, UNKNOWN_USER
from service.model.sasrec import SASRec
from service.offline.data.sampling import Samples
from service.offline.training.config import LossName, TrainConfig


class InnerProduct(Protocol):
    def queries(self, users: Tensor, profiles: Tensor) -> Tensor: ...
    def item_vectors(self, items: Tensor | None = None) -> Tensor: ...


def _normalised_entropy(weights: Tensor) -> Tensor:
    """Mean entropy / log(n) of rows of ``weights`` over their n > 1 non-zero entries."""
    n = (weights > 0).sum(-1)
    rows = n > 1
    w = weights[rows]
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)  # xlogy's gradient at 0 is -inf
    return (entropy / n[rows].float().log()).mean() if bool(rows.any()) else weights.new_zeros(())


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    return -F.logsigmoid(pos - neg).mean()


def warp_loss(pos: Tensor, neg: Tensor, margin: float = 1.0) -> Tensor:
    """The VisRec tutorial's batch WARP-like loss: violations weighted by log(#violations)."""
    soft = torch.sigmoid(neg - pos + margin)
    violated = (soft > 0.5).float()
    weight = violated * (torch.log(violated.sum() + 1) + 1)
    return (weight * soft).mean()


PAIRWISE = {"bpr": bpr_loss, "warp": warp_loss}


@dataclass(frozen=True)
class Objective:
    """How one batch becomes a loss; built once per run from the config and the data."""

    loss: LossName
    sampled: bool  # softmax over sampled negatives (large catalogues)
    negatives: int
    log_q: Tensor  # (N+1,) log-probability of drawing each item as a sampled negative
    profile_dropout: float
    user_dropout: float
    item_dropout: float
    entropy_bonus: float

    @classmethod
    def create(cls, config: TrainConfig, samples: Samples, device: torch.device) -> Objective:
        counts = np.bincount(samples.positives, minlength=samples.n_items + 1).astype(np.float64)
        counts[1:] += 1.0  # every item can be drawn
        counts[PAD] = 0.0
        q = torch.as_tensor(counts / counts.sum(), dtype=torch.float32, device=device)
        return cls(
            loss=config.loss,
            sampled=config.loss == "softmax" and samples.n_items > config.full_softmax_items,
            negatives=config.negatives,
            log_q=q.log(),
            profile_dropout=config.profile_dropout,
            user_dropout=config.user_dropout,
            item_dropout=config.item_dropout,
            entropy_bonus=config.entropy_bonus,
        )

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        users, profiles, pos, neg, when = batch
        times = when if when.numel() else None  # when each profile item came, if given
        if self.profile_dropout:
            hidden = torch.rand(profiles.shape, generator=gen, device=gen.device)
            profiles = profiles.masked_fill(hidden < self.profile_dropout, PAD)
        bonus = torch.zeros(())
        if isinstance(model, ACF) and self.user_dropout:
            hidden = torch.rand(users.shape, generator=gen, device=gen.device)
            users = users.masked_fill(hidden < self.user_dropout, UNKNOWN_USER)
        if pos.ndim == 2:  # every position of each row (sampling.chunk_batches)
            q, pos = _every_position(model, users, profiles, pos, times)
        elif isinstance(model, ACF):
            attended = model.attend_profiles(users, profiles, times)
            q = model.query_vectors(attended.user)  # (B, D')
            if self.entropy_bonus:
                bonus = self.entropy_bonus * _normalised_entropy(attended.item_attention)
        else:
            q = cast(InnerProduct, model).queries(users, profiles)
        vectors = cast(InnerProduct, model).item_vectors
        if isinstance(model, ACF) and self.item_dropout:
            n = model.config.n_items + 1
            hidden = torch.rand(n, generator=gen, device=gen.device) < self.item_dropout
            vectors = partial(model.item_vectors, hidden=hidden.to(q.device))

        if self.loss in PAIRWISE:
            pairs = (q * vectors(pos)).sum(-1), (q * vectors(neg)).sum(-1)
            return PAIRWISE[self.loss](*pairs) - bonus
        if not self.sampled:
            return F.cross_entropy(q @ vectors().T, pos - 1) - bonus
        return self._sampled_softmax(q, pos, vectors, gen) - bonus

    def _sampled_softmax(
        self, q: Tensor, pos: Tensor, vectors: Callable[[Tensor], Tensor], gen: torch.Generator
    ) -> Tensor:
        drawn = torch.multinomial(self.log_q.exp(), self.negatives, True, generator=gen)  # (S,)
        positive = (q * vectors(pos)).sum(-1) - self.log_q[pos]  # (B,)
        negative = q @ vectors(drawn).T - self.log_q[drawn]  # (B, S)
        negative = negative.masked_fill(drawn[None, :] == pos[:, None], -math.inf)
        logits = torch.cat([positive[:, None], negative], dim=1)  # target at column 0
        return F.cross_entropy(logits, torch.zeros_like(pos))


def _every_position(
    model: nn.Module, users: Tensor, rows: Tensor, targets: Tensor, times: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Queries (V, D') of every position of ``rows`` (B, L) that has a target, and those
    targets (V,)."""
    if isinstance(model, ACF):
        q = model.query_vectors(model.attend_every_position(users, rows, times).flatten(0, 1))
    else:
        q = cast(SASRec, model).queries_every_position(users, rows).flatten(0, 1)
    valid = (targets != PAD).flatten()
    return q[valid], targets.flatten()[valid]
