"""Training samples: profiles, negatives, one visit per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from service.offline.data.sampling import (
    build_samples,
    chunk_batches,
    epoch_batches,
    last_items,
    preceding,
    sample_negatives,
    sequence_chunks,
)


def test_profile_is_the_items_just_before_the_positive() -> None:
    rows = preceding(np.array([5, 6, 7, 8]), 2)
    assert rows.tolist() == [[0, 0], [0, 5], [5, 6], [6, 7]]


def test_last_items_pads_on_the_left() -> None:
    out = last_items([np.array([1, 2, 3]), np.array([4]), np.array([], dtype=np.int64)], 2)
    assert out.tolist() == [[2, 3], [0, 4], [0, 0]]


def test_an_epoch_visits_every_interaction_once() -> None:
    seqs = [np.array([1, 2, 3]), np.array([4, 1]), np.array([2, 3, 4, 5])]
    samples = build_samples(seqs, n_items=6, profile_size=9)
    seen = []
    for batch in epoch_batches(samples, 4, np.random.default_rng(0)):
        seen += list(zip(batch.users.tolist(), batch.positives.tolist(), strict=True))
        for u, prof, pos in zip(batch.users, batch.profiles, batch.positives, strict=True):
            seq = seqs[u].tolist()
            t = seq.index(pos)
            assert prof[prof > 0].tolist() == seq[max(0, t - 9) : t]
    expected = [(u, i) for u, s in enumerate(seqs) for i in s.tolist()]
    assert sorted(seen) == sorted(expected)


def test_negatives_are_uniform_over_unseen_items() -> None:
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7])]
    samples = build_samples(seqs, n_items=8, profile_size=3)
    rng = np.random.default_rng(1)
    users = np.zeros(20_000, dtype=np.int64)
    negs = sample_negatives(users, samples, rng)
    assert set(negs.tolist()) == {7, 8}
    assert abs((negs == 7).mean() - 0.5) < 0.02
    other = sample_negatives(np.ones(20_000, dtype=np.int64), samples, rng)
    assert 7 not in other and set(other.tolist()) == {1, 2, 3, 4, 5, 6, 8}


def test_same_seed_same_batches() -> None:
    seqs = [np.arange(1, 30), np.arange(5, 25)]
    samples = build_samples(seqs, n_items=40, profile_size=9)
    a = [b.negatives for b in epoch_batches(samples, 7, np.random.default_rng(3))]
    b = [b.negatives for b in epoch_batches(samples, 7, np.random.default_rng(3))]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_a_user_who_saw_everything_is_refused() -> None:
    with pytest.raises(ValueError, match="every item"):
        build_samples([np.array([1, 2])], n_items=2, profile_size=2)


def test_runs_keep_consecutive_samples_of_a_user_together() -> None:
    seqs = [np.arange(1, 41), np.arange(1, 8), np.arange(3, 30)]
    samples = build_samples(seqs, n_items=50, profile_size=9)
    batches = list(epoch_batches(samples, 1000, np.random.default_rng(0), run=8))
    users = np.concatenate([b.users for b in batches])
    positives = np.concatenate([b.positives for b in batches])
    # still one visit per sample
    assert sorted(zip(users.tolist(), positives.tolist(), strict=True)) == sorted(
        (u, i) for u, s in enumerate(seqs) for i in s.tolist()
    )
    # runs of 8 consecutive positions (the last run of a user may be shorter), in time order
    starts = np.flatnonzero(np.r_[True, (users[1:] != users[:-1]) | (np.diff(positives) != 1)])
    lengths = np.diff(np.r_[starts, len(users)])
    assert set(lengths.tolist()) <= {8, 7, 3}  # 40 = 5x8, 7 = 7, 27 = 3x8 + 3
    assert (lengths == 8).sum() == 8
    # and the runs are shuffled across users
    assert len(np.unique(users[starts][:4])) > 1


def test_times_travel_beside_their_items_in_windows_and_chunks() -> None:
    """Each profile slot's time is its own item's (here 10x the item), however it is cut."""
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 40))[:n] for n in (1, 4, 12)]
    tens = [10 * s for s in sequences]
    samples = build_samples(sequences, n_items=40, profile_size=3, times=tens)
    assert samples.profile_times is not None and samples.times is not None
    np.testing.assert_array_equal(samples.profile_times, 10 * samples.profiles)
    np.testing.assert_array_equal(samples.times, 10 * samples.positives)
    batch = next(epoch_batches(samples, 100, rng, negatives=False))
    np.testing.assert_array_equal(batch.times, 10 * batch.profiles)
    times = samples.time_sequences()
    assert times is not None
    users, rows = sequence_chunks(samples.sequences(), 3)
    when = sequence_chunks(times, 3)[1]
    for batch in chunk_batches(users, rows, batch_size=6, rng=rng, times=when):
        np.testing.assert_array_equal(batch.times, 10 * batch.profiles)


@pytest.mark.parametrize("size", [1, 3, 9])
def test_chunks_make_every_item_the_positive_of_its_own_profile_once(size: int) -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 40))[:n] for n in (1, 2, 3, 9, 10, 11, 25)]
    samples = build_samples(sequences, n_items=40, profile_size=size)
    for s, again in zip(sequences, samples.sequences(), strict=True):
        np.testing.assert_array_equal(s, again)
    users, rows = sequence_chunks(sequences, size)
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    for batch in chunk_batches(users, rows, batch_size=2 * size, rng=rng):
        for u, inputs, targets in zip(batch.users, batch.profiles, batch.positives, strict=True):
            for t in np.flatnonzero(targets):
                profile = tuple(int(i) for i in inputs[: t + 1] if i)
                seen.append((int(u), int(targets[t]), profile))
    windows = {  # (user, item) -> the <= size items just before it
        (u, int(item)): tuple(int(i) for i in s[max(0, t - size) : t])
        for u, s in enumerate(sequences)
        for t, item in enumerate(s)
    }
    assert sorted((u, item) for u, item, _ in seen) == sorted(windows)  # each once
    for u, item, profile in seen:  # the end of its window: what came before it in its row
        window = windows[(u, item)]
        assert profile == window[len(window) - len(profile) :]
    full = sum(len(p) == len(windows[(u, i)]) for u, i, p in seen)
    assert full >= len(seen) / size  # at least each row's last position sees its whole window
