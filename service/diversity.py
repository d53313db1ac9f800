"""A diversity re-rank: maximal marginal relevance (Carbonell and Goldstein, 1998) over the
item vectors, so a list is not ten near-identical posters in a row.

From a pool of the best-scored candidates, items are taken one at a time, each the one with
the most ``(1 - diversity) * relevance - diversity * (its highest cosine to an item already
taken)``, relevance being the score rescaled to 0..1 over the pool. ``diversity`` 0 is the
ranking itself; 1 is the least alike items, whatever their score.
"""

from __future__ import annotations

import numpy as np

POOL = 3  # candidates per item asked for (at least ``MIN_POOL``)
MIN_POOL = 50


def pool_size(wanted: int, n_items: int) -> int:
    """How many best-scored candidates the re-rank of ``wanted`` items chooses from."""
    return min(n_items, max(MIN_POOL, POOL * wanted))


def rerank(scores: np.ndarray, vectors: np.ndarray, wanted: int, diversity: float) -> np.ndarray:
    """Positions into the pool (``scores`` (M,), ``vectors`` (M, D)) of ``wanted`` items, in
    the order taken."""
    m = len(scores)
    if diversity <= 0 or m <= 1:
        return np.argsort(-scores, kind="stable")[:wanted]
    spread = float(scores.max() - scores.min())
    relevance = (scores - scores.min()) / spread if spread > 0 else np.ones(m)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    closest = np.full(m, -1.0)  # the highest cosine to any item taken so far
    taken: list[int] = []
    free = np.ones(m, dtype=bool)
    for _ in range(min(wanted, m)):
        value = np.where(free, (1 - diversity) * relevance - diversity * closest, -np.inf)
        best = int(np.argmax(value))
        taken.append(best)
        free[best] = False
        closest = np.maximum(closest, unit @ unit[best])
    return np.array(taken, dtype=np.int64)


def intra_list_similarity(vectors: np.ndarray) -> float:
    """The mean cosine between the items of one list (its rows), each pair once."""
    if len(vectors) < 2:
        return 0.0
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similar = unit @ unit.T
    upper = np.triu_indices(len(vectors), k=1)
    return float(similar[upper].mean())
