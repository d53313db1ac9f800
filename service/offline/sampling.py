"""Training samples with profiles.

Every training interaction is a positive once per epoch; its profile is the ≤ L items the user
interacted with just before it, and, for pairwise losses, its negative is drawn uniformly from
the items the user has no training interaction with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from service.model.acf import PAD


@dataclass(frozen=True)
class Samples:
    users: np.ndarray  # (T,) int64
    positives: np.ndarray  # (T,) int64, items 1..N
    profiles: np.ndarray  # (T, L) int64, the items just before the positive, PAD-filled
    seen: np.ndarray  # sorted unique keys user * (N + 1) + item of training interactions
    n_items: int


@dataclass(frozen=True)
class Batch:
    users: np.ndarray  # (B,)
    profiles: np.ndarray  # (B, L)
    positives: np.ndarray  # (B,)
    negatives: np.ndarray  # (B,)


def build_samples(sequences: Sequence[np.ndarray], *, n_items: int, profile_size: int) -> Samples:
    """``sequences[u]``: user u's training items in chronological order."""
    users = np.concatenate([np.full(len(s), u, dtype=np.int64) for u, s in enumerate(sequences)])
    positives = np.concatenate(sequences).astype(np.int64)
    profiles = np.concatenate([preceding(s, profile_size) for s in sequences])
    seen = np.unique(users * (n_items + 1) + positives)
    full = [u for u, s in enumerate(sequences) if len(np.unique(s)) >= n_items]
    if full:
        raise ValueError(
            f"{len(full)} user(s) interacted with every item; no negative exists "
            f"for them (e.g. user index {full[0]})"
        )
    return Samples(users, positives, profiles, seen, n_items)


def preceding(sequence: np.ndarray, size: int) -> np.ndarray:
    """Row t holds the ≤ ``size`` items before position t, oldest first, PAD on the left."""
    padded = np.concatenate([np.full(size, PAD, dtype=np.int64), sequence.astype(np.int64)])
    return np.lib.stride_tricks.sliding_window_view(padded, size)[: len(sequence)]


def last_items(sequences: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(U, size): each user's last ``size`` items, oldest first, PAD on the left."""
    out = np.full((len(sequences), size), PAD, dtype=np.int64)
    for u, s in enumerate(sequences):
        tail = s[-size:] if size else s[:0]
        out[u, size - len(tail) :] = tail
    return out


def sample_negatives(users: np.ndarray, samples: Samples, rng: np.random.Generator) -> np.ndarray:
    """For each user, an item drawn uniformly from those they have no training interaction with."""
    stride = samples.n_items + 1
    negatives = rng.integers(1, samples.n_items + 1, size=len(users))
    todo = np.arange(len(users))
    while len(todo):
        keys = users[todo] * stride + negatives[todo]
        pos = np.searchsorted(samples.seen, keys).clip(max=len(samples.seen) - 1)
        todo = todo[samples.seen[pos] == keys]
        negatives[todo] = rng.integers(1, samples.n_items + 1, size=len(todo))
    return negatives


def _shuffled_runs(users: np.ndarray, run: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(users)) that keeps runs of ``run`` consecutive samples of a
    user together (samples are stored user by user) and shuffles the runs."""
    if run <= 1:
        return rng.permutation(len(users))
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # first sample of each user
    position = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    _, run_id = np.unique(users * (position.max() + 1) + position // run, return_inverse=True)
    rank = rng.permutation(run_id.max() + 1)
    return np.argsort(rank[run_id], kind="stable")


def epoch_batches(
    samples: Samples,
    batch_size: int,
    rng: np.random.Generator,
    *,
    run: int = 1,
    negatives: bool = True,
) -> Iterator[Batch]:
    """One epoch: every sample once, shuffled without replacement, with fresh negatives (an
    empty array when ``negatives`` is false: softmax losses need none).

    With ``run`` > 1, what is shuffled are runs of up to ``run`` consecutive samples of one user
    (their profiles are overlapping windows), so a batch holds fewer distinct (user, item)
    pairs and ACF computes its component attention for each pair once.
    """
    order = _shuffled_runs(samples.users, run, rng)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        users = samples.users[idx]
        yield Batch(
            users,
            samples.profiles[idx],
            samples.positives[idx],
            sample_negatives(users, samples, rng) if negatives else np.zeros(0, dtype=np.int64),
        )
