"""Offline ranking metrics over the whole catalogue, with bootstrap intervals.

Each user has exactly one held-out (target) item. Every item column 0..N-1 is scored; the columns
in the user's exclusion row are removed from the ranking, and the target's 0-based rank ``r``
among the remaining candidates is what every metric is computed from.

Two protocols differ only in what is excluded (the caller builds the exclusions) and in the AUC
denominator:

- ``seed`` (the VisRec tutorial's): only the user's given profile items are excluded, and
  AUC = 1 - r / (N - 1) with N the full catalogue size.
- ``standard``: all of the user's training and validation items are excluded, and
  AUC = 1 - r / (C - 1) with C the number of candidates (the target included).

Ties are pessimistic: a candidate scoring exactly as much as the target ranks above it, so a model
that scores everything equally gets the worst possible rank rather than a lucky one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

KS: tuple[int, ...] = (20, 100, 200)

# Largest number of score entries compared at once in rank_targets: bounds the boolean temporary
# to 16 MiB however large the catalogue.
_MAX_BLOCK = 1 << 24
# Largest number of resampled indices held at once in a bootstrap (32 MiB of int64).
_MAX_RESAMPLE_BLOCK = 1 << 22

HEADLINE = ("R@20", "nDCG@20")  # what "wins" means on the page


@dataclass(frozen=True)
class Exclusions:
    """Per-user item columns removed from the ranking, as CSR rows.

    Row ``u`` is ``indices[indptr[u]:indptr[u + 1]]``; rows may be empty but hold no duplicates.

    Attributes:
        indptr: (U + 1,) int, starts at 0, non-decreasing, ends at ``len(indices)``.
        indices: (nnz,) int, non-negative item columns.
    """

    indptr: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        indptr, indices = self.indptr, self.indices
        if indptr.ndim != 1 or indices.ndim != 1:
            raise ValueError("indptr and indices must be 1-D")
        if not (_is_int(indptr) and _is_int(indices)):
            raise ValueError("indptr and indices must have an integer dtype")
        if indptr.size == 0 or indptr[0] != 0 or indptr[-1] != indices.size:
            raise ValueError("indptr must start at 0 and end at len(indices)")
        if np.any(np.diff(indptr) < 0):
            raise ValueError("indptr must be non-decreasing")
        if np.any(indices < 0):
            raise ValueError("excluded item columns must be non-negative")
        rows = self.row_ids()
        order = np.lexsort((indices, rows))
        same = (np.diff(rows[order]) == 0) & (np.diff(indices[order]) == 0)
        if np.any(same):
            # A duplicate would be subtracted twice from the rank and the candidate count.
            raise ValueError("an exclusion row holds a duplicate item column")

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> Exclusions:
        """Builds the CSR rows from one list of excluded item columns per user."""
        lengths = np.fromiter((len(row) for row in lists), dtype=np.int64, count=len(lists))
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = [int(item) for row in lists for item in row]
        return cls(indptr=indptr, indices=np.asarray(flat, dtype=np.int64))

    @property
    def n_rows(self) -> int:
        """Number of users U."""
        return int(self.indptr.size - 1)

    def row_ids(self) -> np.ndarray:
        """(nnz,) int64: the user row of each entry of ``indices``."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))


def rank_targets(
    scores: np.ndarray,
    targets: np.ndarray,
    exclude: Exclusions,
    *,
    max_block: int = _MAX_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks each user's target among the items not excluded for that user.

    The rank counts the candidates other than the target whose score is >= the target's, so ties
    count against the model. Users are processed in row chunks of at most ``max_block`` score
    entries, so memory stays bounded for large catalogues.

    Args:
        scores: (U, N) float, higher is better; NaN raises, +-inf is allowed.
        targets: (U,) int, the held-out item column of each user.
        exclude: U rows of item columns removed from the ranking; none may be the target.
        max_block: most score entries compared at once.

    Returns:
        ranks: (U,) int64, 0-based rank of the target among the candidates.
        n_candidates: (U,) int64, N minus the number of excluded columns (target included).
    """
    _check_rank_inputs(scores, targets, exclude)
    n_users, n_items = scores.shape
    users = np.arange(n_users)
    target_scores = scores[users, targets]  # (U,)
    rows, cols = exclude.row_ids(), exclude.indices
    excluded_above = scores[rows, cols] >= target_scores[rows]  # (nnz,)
    ranks = _count_at_least(scores, target_scores, max(1, max_block // max(n_items, 1)))
    ranks -= 1  # the target itself
    ranks -= np.bincount(rows[excluded_above], minlength=n_users)
    n_candidates = n_items - np.diff(exclude.indptr).astype(np.int64)
    return ranks, n_candidates


def _check_rank_inputs(scores: np.ndarray, targets: np.ndarray, exclude: Exclusions) -> None:
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be a 2-D float array, got {scores.dtype} {scores.shape}")
    n_users, n_items = scores.shape
    if targets.shape != (n_users,) or not _is_int(targets):
        raise ValueError(f"targets must be ({n_users},) int, got {targets.dtype} {targets.shape}")
    if exclude.n_rows != n_users:
        raise ValueError(f"exclusions have {exclude.n_rows} rows for {n_users} users")
    if np.any((targets < 0) | (targets >= n_items)):
        raise ValueError(f"targets must be item columns in [0, {n_items})")
    if np.any(exclude.indices >= n_items):
        raise ValueError(f"excluded item columns must be < {n_items}")
    if np.any(exclude.indices == targets[exclude.row_ids()]):
        raise ValueError("a user's target is among their excluded items")


def _count_at_least(scores: np.ndarray, thresholds: np.ndarray, chunk_rows: int) -> np.ndarray:
    """(U,) int64: per row, how many entries of ``scores`` are >= that row's threshold."""
    counts = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], chunk_rows):
        block = scores[start : start + chunk_rows]  # (B, N)
        if np.isnan(block).any():
            raise ValueError("scores contain NaN")
        stop = start + block.shape[0]
        counts[start:stop] = np.count_nonzero(block >= thresholds[start:stop, None], axis=1)
    return counts


def metric_table(
    ranks: np.ndarray,
    n_candidates: np.ndarray,
    *,
    catalogue_size: int,
    protocol: Literal["seed", "standard"],
    ks: Sequence[int] = KS,
) -> dict[str, np.ndarray]:
    """Per-user metric values from target ranks.

    With r the 0-based rank: R@k = [r < k], P@k = R@k / k, nDCG@k = 1 / log2(r + 2) if r < k
    else 0, RR = 1 / (r + 1); AUC = 1 - r / (D - 1) with D = ``catalogue_size`` for ``seed`` and
    D = the user's candidate count for ``standard``.

    Args:
        ranks: (U,) int, 0-based, each < the matching ``n_candidates``.
        n_candidates: (U,) int, candidates per user (target included).
        catalogue_size: N, number of item columns.
        protocol: which AUC denominator to use.
        ks: positive cut-offs.

    Returns:
        Keys "AUC", "RR", then "R@k", "P@k", "nDCG@k" for each k in order; each value (U,) float64.
    """
    _check_table_inputs(ranks, n_candidates, catalogue_size, protocol, ks)
    r = ranks.astype(np.float64)
    if protocol == "seed":
        denominator = np.full_like(r, catalogue_size - 1)
    else:
        denominator = n_candidates.astype(np.float64) - 1
    table = {"AUC": 1.0 - r / denominator, "RR": 1.0 / (r + 1.0)}
    gain = 1.0 / np.log2(r + 2.0)
    for k in ks:
        hit = (ranks < k).astype(np.float64)
        table[f"R@{k}"] = hit
        table[f"P@{k}"] = hit / k
        table[f"nDCG@{k}"] = hit * gain
    return table


def _check_table_inputs(
    ranks: np.ndarray,
    n_candidates: np.ndarray,
    catalogue_size: int,
    protocol: str,
    ks: Sequence[int],
) -> None:
    if protocol not in ("seed", "standard"):
        raise ValueError(f"unknown protocol {protocol!r}")
    if ranks.ndim != 1 or n_candidates.shape != ranks.shape:
        raise ValueError(f"ranks {ranks.shape} and n_candidates {n_candidates.shape} must be (U,)")
    if not (_is_int(ranks) and _is_int(n_candidates)):
        raise ValueError("ranks and n_candidates must have an integer dtype")
    if np.any(ranks < 0) or np.any(ranks >= n_candidates):
        raise ValueError("ranks must lie in [0, n_candidates)")
    if np.any(n_candidates > catalogue_size):
        raise ValueError("n_candidates cannot exceed catalogue_size")
    # AUC is undefined with a single candidate: there is nothing to rank the target against.
    smallest = catalogue_size if protocol == "seed" else n_candidates.min(initial=2)
    if smallest < 2:
        raise ValueError(f"AUC needs at least 2 candidates under protocol {protocol!r}")
    if any(k < 1 for k in ks):
        raise ValueError(f"cut-offs must be positive, got {tuple(ks)}")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    mean: float
    low: float
    high: float


def bootstrap(
    values: np.ndarray,
    *,
    rng: np.random.Generator,
    n_resamples: int = 1000,
    level: float = 0.95,
) -> Interval:
    """Mean over users with a percentile bootstrap interval (users resampled with replacement).

    Args:
        values: (U,) float, one value per user; NaN raises.
        rng: source of the resampled user indices.
        n_resamples: number of bootstrap resamples.
        level: coverage of the interval, in (0, 1).
    """
    _check_values(values)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = _resampled_means(values, rng, n_resamples)  # (n_resamples,)
    return _percentile_interval(float(values.mean()), means, level)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    rng: np.random.Generator,
    n_resamples: int = 1000,
    level: float = 0.95,
) -> Interval:
    """Mean of ``a - b`` with an interval resampling the same users for both (paired).

    Pairing removes the between-user variance both systems share, so the interval is much
    narrower than comparing two independent intervals when ``a`` and ``b`` are correlated.

    Args:
        a: (U,) float, per-user values of the first system.
        b: (U,) float, the second system's values for the same users, in the same order.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    # Resampling users of a - b is exactly resampling the same user indices in a and in b.
    return bootstrap(a - b, rng=rng, n_resamples=n_resamples, level=level)


def summarise(
    table: dict[str, np.ndarray],
    *,
    rng: np.random.Generator,
    n_resamples: int = 1000,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Bootstrap interval of every metric in a ``metric_table``, keys in the same order."""
    return {
        name: bootstrap(values, rng=rng, n_resamples=n_resamples, level=level)
        for name, values in table.items()
    }


def _check_values(values: np.ndarray) -> None:
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("values contain NaN")


def _resampled_means(values: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """(n_resamples,) means of ``values`` over users drawn with replacement."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    n_users = values.size
    chunk = max(1, _MAX_RESAMPLE_BLOCK // n_users)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        picks = rng.integers(0, n_users, size=(stop - start, n_users))  # (B, U)
        means[start:stop] = values[picks].mean(axis=1)
    return means


def _percentile_interval(mean: float, means: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean=mean, low=float(low), high=float(high))


def _is_int(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer))
