"""What the diversity re-rank of ``/recommend`` costs and buys, measured on a protocol's users.

Each user's top 20 is taken as the service takes it (``service/diversity.py``): the
``pool_size`` best-scored items the protocol leaves in the ranking, re-ranked by maximal
marginal relevance over the model's item vectors at each setting of ``diversity``. R@20 and
nDCG@20 of the held-out item, and the intra-list similarity of the 20 (ILS@20: the mean cosine
between their item vectors, the vectors the re-rank reads), per user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from service.diversity import intra_list_similarity, pool_size, rerank
from service.offline.evaluation.evaluate import Task, score_users
from service.offline.evaluation.metrics import Interval, paired_bootstrap

K = 20
SETTINGS = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class DiversityRow:
    diversity: float
    recall: float  # R@20, mean over users
    ndcg: float  # nDCG@20
    ndcg_change: Interval  # nDCG@20 minus its value at diversity 0, paired over users
    ils: float  # ILS@20


def diversity_rows(
    model: nn.Module,
    task: Task,
    *,
    device: torch.device,
    rng: np.random.Generator,
    settings: Sequence[float] = SETTINGS,
    n_resamples: int = 1000,
) -> list[DiversityRow]:
    """One row per setting of ``diversity`` (the first is the baseline of the change)."""
    scores = score_users(
        model,  # type: ignore[arg-type]
        task.users,
        task.profiles,
        device=device,
        times=task.times,
    )
    scores[task.exclude.row_ids(), task.exclude.indices] = -np.inf  # what the protocol removes
    vectors = model.item_vectors().detach().float().cpu().numpy()  # type: ignore[operator]
    depth = pool_size(K, task.n_items)
    pools = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # (U, depth) columns
    rows: list[DiversityRow] = []
    base: np.ndarray | None = None
    for setting in settings:
        hits, gains, ils = _lists(scores, pools, vectors, task.targets - 1, setting)
        base = gains if base is None else base
        change = paired_bootstrap(gains, base, rng=rng, n_resamples=n_resamples)
        rows.append(
            DiversityRow(
                setting, float(hits.mean()), float(gains.mean()), change, float(ils.mean())
            )
        )
    return rows


def _lists(
    scores: np.ndarray,
    pools: np.ndarray,
    vectors: np.ndarray,
    targets: np.ndarray,
    diversity: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: hit@20, nDCG@20 and ILS@20 of the re-ranked list."""
    n = len(pools)
    hits, gains, ils = np.zeros(n), np.zeros(n), np.zeros(n)
    for u, pool in enumerate(pools):
        pool = pool[np.isfinite(scores[u, pool])]  # what the protocol left in the ranking
        shown = pool[rerank(scores[u, pool], vectors[pool], K, diversity)]
        where = np.flatnonzero(shown == targets[u])
        if len(where):
            hits[u], gains[u] = 1.0, 1.0 / np.log2(where[0] + 2)
        ils[u] = intra_list_similarity(vectors[shown])
    return hits, gains, ils
