"""Full-catalogue evaluation of any model with ``score_all(users, profiles) -> (B, N)``.

Protocols (one held-out item per user, ranked among the whole catalogue):
- ``seed``: the VisRec tutorial's. The model sees the user's last 10 training items, and only
  those 10 are removed from the ranking.
- ``standard``: the model sees the last 9 training items (as when serving) and every training
  and validation item of the user is removed from the ranking.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from service.model.acf import ACF
from service.model.projection import Projection
from service.model.serving import ServingModel
from service.offline.data.dataset import Split
from service.offline.data.sampling import last_items
from service.offline.evaluation.metrics import Exclusions, metric_table, rank_targets

ProtocolName = Literal["seed", "standard"]
PROTOCOLS: tuple[ProtocolName, ...] = ("seed", "standard")
SEED_PROFILE = 10


class Scorer(Protocol):
    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor: ...


def reads_times(model: object) -> bool:
    """Whether ``model`` needs its profiles' times (an ACF with ``ages``)."""
    return isinstance(model, ACF) and model.config.ages


@dataclass(frozen=True)
class Task:
    """Who is ranked, with which profile, for which held-out item, with what removed."""

    users: np.ndarray  # (U,)
    profiles: np.ndarray  # (U, L) items, PAD-filled
    targets: np.ndarray  # (U,) items 1..N
    exclude: Exclusions  # per user, item columns 0..N-1 removed from the ranking
    n_items: int
    protocol: ProtocolName
    times: np.ndarray | None = None  # (U, L) when each profile item came, in seconds


def holdout_task(split: Split, protocol: ProtocolName, *, profile_size: int = 9) -> Task:
    """The held-out test item of every user who has one."""
    seqs = split.train_sequences()
    users = split.test_users
    size = SEED_PROFILE if protocol == "seed" else profile_size
    profiles = last_items([seqs[u] for u in users], size)
    if protocol == "seed":
        removed: list[np.ndarray] = [p[p > 0] for p in profiles]
    else:
        val = dict(zip(split.val_users.tolist(), split.val_items.tolist(), strict=True))
        removed = [np.append(seqs[u], [val[u]] if u in val else []) for u in users.tolist()]
    times = profile_times(split, users, size)
    return _task(users, profiles, times, split.test_items, removed, split.n_items, protocol)


def validation_task(
    split: Split, protocol: ProtocolName = "standard", *, profile_size: int = 9
) -> Task:
    """The validation item of every user who has one, under ``protocol`` as
    :func:`holdout_task` applies it to the training items: ``standard`` removes them all,
    ``seed`` shows the last 10 and removes only those."""
    seqs = split.train_sequences()
    users = split.val_users
    size = SEED_PROFILE if protocol == "seed" else profile_size
    profiles = last_items([seqs[u] for u in users], size)
    removed = [p[p > 0] for p in profiles] if protocol == "seed" else [seqs[u] for u in users]
    times = profile_times(split, users, size)
    return _task(users, profiles, times, split.val_items, removed, split.n_items, protocol)


def profile_times(split: Split, users: np.ndarray, size: int) -> np.ndarray:
    """(U, size) when each of the users' last ``size`` training items came (0 on PAD)."""
    times = split.train_time_sequences()
    return last_items([times[u] for u in users], size)


def _task(
    users: np.ndarray,
    profiles: np.ndarray,
    times: np.ndarray,
    targets: np.ndarray,
    removed: Sequence[np.ndarray],
    n_items: int,
    protocol: ProtocolName,
) -> Task:
    if len(users) == 0:
        raise ValueError(f"nothing to evaluate: no user has a held-out item ({protocol})")
    exclude = Exclusions.from_lists([(np.asarray(r, dtype=np.int64) - 1).tolist() for r in removed])
    return Task(users, profiles, targets, exclude, n_items, protocol, times)


@torch.inference_mode()
def score_users(
    model: Scorer,
    users: np.ndarray,
    profiles: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 512,
    times: np.ndarray | None = None,
) -> np.ndarray:
    """(U, N) float32 scores of items 1..N (column j = item j+1); ``times``: the profiles',
    given to a model that reads them."""
    chunks = []
    for start in range(0, len(users), batch_size):
        part = slice(start, start + batch_size)
        u = torch.as_tensor(users[part], device=device)
        p = torch.as_tensor(profiles[part], device=device)
        if reads_times(model):  # an ACF with ages, which refuses to go without them
            t = None if times is None else torch.as_tensor(times[part], device=device)
            scores = model.score_all(u, p, t)  # type: ignore[call-arg]
        else:
            scores = model.score_all(u, p)
        chunks.append(scores.float().cpu().numpy())
    return np.concatenate(chunks)


def evaluate(model: Scorer, task: Task, *, device: torch.device) -> dict[str, np.ndarray]:
    """Per-user metric table (AUC, RR, R@k, P@k, nDCG@k) for ``task``."""
    scores = score_users(model, task.users, task.profiles, device=device, times=task.times)
    ranks, n_candidates = rank_targets(scores, task.targets - 1, task.exclude)
    return metric_table(ranks, n_candidates, catalogue_size=task.n_items, protocol=task.protocol)


def rank_new_items(
    model: ACF,
    projection: Projection | None,
    features: np.ndarray,
    task: Task,
    *,
    k: int = 20,
    device: torch.device,
) -> np.ndarray:
    """(U, k) 0-based rows of ``features``, the raw (M, K, C) features of items no model was
    trained on: the k of them each user of ``task`` is shown first, ranked among themselves,
    once they are added while serving (:meth:`ServingModel.with_items`, what ``POST /items``
    does). ValueError for a model that cannot score items from their images."""
    serving = ServingModel.from_model(
        copy.deepcopy(model), device=device, projection=projection, dtype=np.float32
    )
    grown = serving.with_items(features)
    queries = grown.queries(task.users, task.profiles, task.times)
    scores = queries @ grown.item_vectors[model.config.n_items :].T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
