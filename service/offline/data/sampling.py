"""Training samples with profiles.

Every training interaction is a positive once per epoch; its profile is the ≤ L items the user
interacted with just before it, and, for pairwise losses, its negative is drawn uniformly from
the items the user has no training interaction with.

Two ways to batch them: one sample per window (:func:`epoch_batches`: a batch row is a profile
and its positive), or every position of a stretch of a user's sequence at once
(:func:`chunk_batches`: a batch row is L + 1 consecutive items; the model reads the first L
once, causally, and each item after the first is the positive of the items before it in the
row, as SASRec is trained).
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
    # When each positive came (T,) and its profile's items (T, L), in seconds; None: not given
    times: np.ndarray | None = None
    profile_times: np.ndarray | None = None

    def sequences(self) -> list[np.ndarray]:
        """Each user's training items in order (the samples are stored user by user)."""
        return self._per_user(self.positives)

    def time_sequences(self) -> list[np.ndarray] | None:
        """The times of :meth:`sequences`' items; None when the samples have none."""
        return None if self.times is None else self._per_user(self.times)

    def _per_user(self, values: np.ndarray) -> list[np.ndarray]:
        starts = np.flatnonzero(np.r_[True, self.users[1:] != self.users[:-1]])
        return np.split(values, starts[1:]) if len(self.users) else []


@dataclass(frozen=True)
class Batch:
    users: np.ndarray  # (B,)
    profiles: np.ndarray  # (B, L)
    positives: np.ndarray  # (B,)
    negatives: np.ndarray  # (B,)
    times: np.ndarray  # (B, L) when each profile item came, in seconds; empty: not given


def build_samples(
    sequences: Sequence[np.ndarray],
    *,
    n_items: int,
    profile_size: int,
    times: Sequence[np.ndarray] | None = None,
) -> Samples:
    """``sequences[u]``: user u's training items in chronological order; ``times[u]``: when
    each came, in seconds (for a model that reads the profile items' ages)."""
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
    if times is None:
        return Samples(users, positives, profiles, seen, n_items)
    flat = np.concatenate(times).astype(np.int64)
    before = np.concatenate([preceding(t, profile_size) for t in times])
    return Samples(users, positives, profiles, seen, n_items, flat, before)


def preceding(sequence: np.ndarray, size: int) -> np.ndarray:
    """Row t holds the ≤ ``size`` items (or their times) before position t, oldest first, PAD
    on the left."""
    padded = np.concatenate([np.full(size, PAD, dtype=np.int64), sequence.astype(np.int64)])
    return np.lib.stride_tricks.sliding_window_view(padded, size)[: len(sequence)]


def last_items(sequences: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(U, size): each user's last ``size`` items (or their times), oldest first, PAD on the
    left."""
    out = np.full((len(sequences), size), PAD, dtype=np.int64)
    for u, s in enumerate(sequences):
        tail = s[-size:] if size else s[:0]
        out[u, size - len(tail) :] = tail
    return out


def sequence_chunks(sequences: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Users (C,) and rows (C, size + 1) of consecutive items (or their times: the same cuts),
    oldest first, PAD on the left:
    each user's sequence cut from its end into stretches that overlap by one item, so every
    item is the positive of exactly one row position (a user's first item, of an empty
    profile), as in :func:`build_samples`. A position's profile is the items before it in its
    row only, so it holds between 0 and ``size`` items."""
    users, rows = [], []
    for u, s in enumerate(sequences):
        for end in range(len(s), 0, -size):
            row = np.full(size + 1, PAD, dtype=np.int64)
            part = s[max(0, end - size - 1) : end]
            row[size + 1 - len(part) :] = part
            users.append(u)
            rows.append(row)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, size + 1), dtype=np.int64)
    return np.array(users, dtype=np.int64), np.stack(rows)


def rows_per_batch(batch_size: int, size: int) -> int:
    """Rows of :func:`chunk_batches` (``size`` positives each) in a batch of ~``batch_size``."""
    return max(1, batch_size // size)


def chunk_batches(
    users: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    times: np.ndarray | None = None,
) -> Iterator[Batch]:
    """One epoch of :func:`sequence_chunks`' rows, shuffled, about ``batch_size`` positives a
    batch: ``profiles`` (B, L) are each row's first L items and ``positives`` (B, L) the L
    after them (PAD where a position has no positive); ``times``: the rows' times, cut alike."""
    per_batch = rows_per_batch(batch_size, rows.shape[1] - 1)
    order = rng.permutation(len(users))
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        when = NO_TIMES if times is None else times[idx, :-1]
        yield Batch(users[idx], rows[idx, :-1], rows[idx, 1:], NO_ITEMS, when)


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
            sample_negatives(users, samples, rng) if negatives else NO_ITEMS,
            NO_TIMES if samples.profile_times is None else samples.profile_times[idx],
        )


NO_ITEMS = np.zeros(0, dtype=np.int64)  # a batch's negatives when the loss draws none
NO_TIMES = np.zeros((0, 0), dtype=np.int64)  # a batch's times when the samples have none
