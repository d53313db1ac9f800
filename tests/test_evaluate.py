"""The two evaluation protocols, checked against a slow per-user reference on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from service.offline.data.dataset import Split, leave_last_out, load_dataset
from service.offline.evaluation.evaluate import evaluate, holdout_task, validation_task


class FixedScores:
    """A 'model' whose scores are a given (U, N) matrix, row = user index."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = torch.as_tensor(scores)
        self.profiles_seen: list[Tensor] = []

    def score_all(self, users: Tensor, profiles: Tensor) -> Tensor:
        self.profiles_seen.append(profiles)
        return self.scores[users]


@pytest.fixture(scope="module")
def split(ml100k: Path) -> Split:
    return leave_last_out(load_dataset(ml100k, check_images=False))


def _reference_rank(scores: np.ndarray, target: int, removed: set[int]) -> tuple[int, int]:
    """0-based position of ``target`` among the candidates, ties placed against the model."""
    candidates = [j for j in range(1, len(scores) + 1) if j not in removed]
    ordered = sorted(candidates, key=lambda j: (-scores[j - 1], j == target))
    return ordered.index(target), len(candidates)


@pytest.mark.parametrize("protocol", ["seed", "standard"])
def test_protocols_match_a_slow_reference(split: Split, protocol: str) -> None:
    rng = np.random.default_rng(0)
    # integer scores: many ties, which must count against the model
    scores = rng.integers(0, 50, size=(split.n_users, split.n_items)).astype(np.float32)
    model = FixedScores(scores)
    table = evaluate(model, holdout_task(split, protocol), device=torch.device("cpu"))  # type: ignore[arg-type]
    seqs = split.train_sequences()
    val = dict(zip(split.val_users.tolist(), split.val_items.tolist(), strict=True))
    for k, (u, target) in enumerate(
        zip(split.test_users.tolist(), split.test_items.tolist(), strict=True)
    ):
        if k % 37:  # a sample of users keeps the slow reference quick
            continue
        if protocol == "seed":
            removed = set(seqs[u][-10:].tolist())
        else:
            removed = set(seqs[u].tolist()) | {val[u]}
        r, n = _reference_rank(scores[u], target, removed)
        auc_n = split.n_items if protocol == "seed" else n
        assert table["RR"][k] == pytest.approx(1 / (r + 1))
        assert table["AUC"][k] == pytest.approx(1 - r / (auc_n - 1))
        assert table["R@20"][k] == (r < 20)
        assert table["nDCG@100"][k] == pytest.approx(1 / np.log2(r + 2) if r < 100 else 0)


def test_the_model_sees_the_protocols_profile(split: Split) -> None:
    seqs = split.train_sequences()
    for protocol, size in (("seed", 10), ("standard", 9)):
        model = FixedScores(np.zeros((split.n_users, split.n_items), dtype=np.float32))
        evaluate(model, holdout_task(split, protocol), device=torch.device("cpu"))  # type: ignore[arg-type]
        profiles = torch.cat(model.profiles_seen).numpy()
        assert profiles.shape == (len(split.test_users), size)
        u = int(split.test_users[5])
        assert profiles[5].tolist() == seqs[u][-size:].tolist()


@pytest.mark.parametrize("protocol", ["seed", "standard"])
def test_validation_never_sees_the_test_item(split: Split, protocol: str) -> None:
    task = validation_task(split, protocol)  # type: ignore[arg-type]
    test = dict(zip(split.test_users.tolist(), split.test_items.tolist(), strict=True))
    assert not any(
        test[u] in p.tolist() for u, p in zip(task.users.tolist(), task.profiles, strict=True)
    )
    np.testing.assert_array_equal(task.targets, split.val_items)


def test_seed_validation_is_the_seed_protocol_one_step_earlier(split: Split) -> None:
    """The twin the epochs are chosen on: the last 10 training items shown and only they
    removed, as the test item is ranked under `seed`; `standard` removes every training item."""
    seqs = split.train_sequences()
    seed, standard = validation_task(split, "seed"), validation_task(split, "standard")
    removed = {"seed": np.diff(seed.exclude.indptr), "standard": np.diff(standard.exclude.indptr)}
    long = [i for i, u in enumerate(seed.users.tolist()) if len(seqs[u]) > 10]
    assert len(long) > 100
    for i in long[:50]:
        u = int(seed.users[i])
        assert seed.profiles[i].tolist() == seqs[u][-10:].tolist()
        assert removed["seed"][i] == 10 and removed["standard"][i] == len(set(seqs[u].tolist()))
        kept = seed.exclude.indices[seed.exclude.indptr[i] : seed.exclude.indptr[i + 1]]
        assert sorted(kept + 1) == sorted(seqs[u][-10:].tolist())


def test_a_perfect_model_scores_one(split: Split) -> None:
    scores = np.zeros((split.n_users, split.n_items), dtype=np.float32)
    scores[split.test_users, split.test_items - 1] = 1.0
    table = evaluate(
        FixedScores(scores),
        holdout_task(split, "standard"),  # type: ignore[arg-type]
        device=torch.device("cpu"),
    )
    assert table["AUC"].mean() == 1.0 and table["R@20"].mean() == 1.0
