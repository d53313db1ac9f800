"""The baselines against slow, obviously correct references and known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.model.acf import PAD
from service.model.sasrec import SASRec, SASRecConfig
from service.offline.data.dataset import Split
from service.offline.data.sampling import build_samples
from service.offline.evaluation.evaluate import validation_task
from service.offline.training.baselines import EASE, Transitions
from service.offline.training.config import TrainConfig
from service.offline.training.train import build_model, train


def test_transitions_match_a_hand_computation() -> None:
    # one sequence 1 2 3; window 2: T[1,2] += 1, T[2,3] += 1, T[1,3] += 1/2
    model = Transitions([np.array([1, 2, 3])], 4, window=2, decay=0.5, popularity_weight=0.0)
    t = np.zeros((5, 5))
    t[1, 2], t[2, 3], t[1, 3] = 1.0, 1.0, 0.5
    t /= np.maximum(t.sum(1, keepdims=True), 1e-12)  # rows: 1 -> (2: 2/3, 3: 1/3), 2 -> 3
    # profile [PAD, 1, 2]: newest (2) weight 1, one step back (1) weight 0.5, normalised
    expected = (1.0 * t[2] + 0.5 * t[1]) / 1.5
    scores = model.score_all(torch.tensor([0]), torch.tensor([[PAD, 1, 2]]))
    np.testing.assert_allclose(scores[0].numpy(), expected[1:], rtol=1e-6)


def test_transitions_add_the_popularity_share() -> None:
    seqs = [np.array([1, 2]), np.array([1])]
    model = Transitions(seqs, 3, window=5, decay=0.8, popularity_weight=0.1)
    empty = model.score_all(torch.tensor([0]), torch.tensor([[PAD, PAD]]))
    np.testing.assert_allclose(empty[0].numpy(), 0.1 * np.array([2, 1, 0]) / 3, rtol=1e-6)


def test_ease_equals_one_ridge_regression_per_item() -> None:
    """EASE's closed form is, column by column, the ridge regression of item j on all other
    items (its zero-diagonal constraint): solved here the slow way."""
    rng = np.random.default_rng(0)
    n_users, n_items, l2 = 30, 8, 3.0
    x = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    users, items = np.nonzero(x)
    model = EASE(users, items + 1, n_users, n_items, l2=l2)
    for j in range(n_items):
        others = [i for i in range(n_items) if i != j]
        a = x[:, others]
        coef = np.linalg.solve(a.T @ a + l2 * np.eye(n_items - 1), a.T @ x[:, j])
        np.testing.assert_allclose(model.weights[others, j].numpy(), coef, rtol=1e-4, atol=1e-6)
        assert model.weights[j, j] == 0
    scores = model.score_all(torch.arange(n_users), torch.zeros(n_users, 1, dtype=torch.long))
    np.testing.assert_allclose(scores.numpy(), x @ model.weights.double().numpy(), rtol=1e-4)


def _walks(n_users: int, cycle: int, length: int, seed: int) -> Split:
    """Users walk round a cycle of items, half of them up (1 2 3 ...), half down (3 2 1 ...):
    after item 3 comes 4 or 2 depending on the item before it, so only order tells (a bag of
    the last items, {2, 3}, is the same for ... 2 3 -> 4 and ... 3 2 -> 1)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        step = 1 if u % 2 == 0 else -1
        start = int(rng.integers(cycle))
        walk = (start + step * np.arange(length)) % cycle + 1
        users += [u] * length
        items += walk.tolist()
    users_a, items_a = np.array(users), np.array(items)
    last = np.r_[users_a[1:] != users_a[:-1], True]
    val = np.r_[last[1:], False]
    train_rows = ~(last | val)
    return Split(
        n_users,
        cycle,
        users_a[train_rows],
        items_a[train_rows],
        users_a[val],
        items_a[val],
        users_a[last],
        items_a[last],
        np.flatnonzero(train_rows),  # one interaction a second
    )


def test_sasrec_learns_an_order_only_pattern() -> None:
    split = _walks(n_users=60, cycle=40, length=30, seed=0)
    config = TrainConfig(
        model="sasrec",
        dim=32,
        epochs=30,
        batch_size=128,
        lr=5e-3,
        dropout=0.0,
        patience=0,
        profile_size=4,
    )
    model = build_model(config, split, np.zeros((40, 1, 1)))
    samples = build_samples(split.train_sequences(), n_items=40, profile_size=4)
    train(
        model,
        samples,
        [validation_task(split, profile_size=4)],
        config,
        device=torch.device("cpu"),
        rng=np.random.default_rng(0),
        progress=False,
    )
    up = torch.tensor([[1, 2, 3, 4], [36, 37, 38, 39], [10, 11, 12, 13]])
    down = torch.tensor([[7, 6, 5, 4], [2, 1, 40, 39], [14, 13, 12, 11]])
    with torch.no_grad():
        assert (model.score_all(torch.zeros(3), up).argmax(1) + 1).tolist() == [5, 40, 14]
        assert (model.score_all(torch.zeros(3), down).argmax(1) + 1).tolist() == [3, 38, 10]


def test_sasrec_padding_and_longer_profiles_change_nothing() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=12, max_len=4, dim=8)).eval()
    base = model.score_all(torch.zeros(1), torch.tensor([[PAD, 3, 5, 7]]))
    longer = model.score_all(torch.zeros(1), torch.tensor([[9, 11, PAD, 3, 5, 7]]))  # cut to 4
    torch.testing.assert_close(longer, base)
    garbage = model.item_embedding.weight.detach().clone()
    with torch.no_grad():  # what sits in the padding row must not leak into any output
        model.item_embedding.weight[PAD] = 100.0
    again = model.score_all(torch.zeros(1), torch.tensor([[PAD, 3, 5, 7]]))
    torch.testing.assert_close(again[:, 1:], base[:, 1:])  # column 0 is item 1, not PAD
    with torch.no_grad():
        model.item_embedding.weight.copy_(garbage)
    empty = model.score_all(torch.zeros(1), torch.tensor([[PAD, PAD, PAD, PAD]]))
    assert torch.isfinite(empty).all()


@pytest.mark.parametrize("length", [1, 3, 4])
def test_sasrec_is_causal(length: int) -> None:
    """The state at a position does not depend on later positions."""
    torch.manual_seed(1)
    model = SASRec(SASRecConfig(n_items=12, max_len=4, dim=8)).eval()
    a = model.encode(torch.tensor([[1, 2, 3, 4]]))
    b = model.encode(torch.tensor([[1, 2, 3, 4][:length] + [9, 10, 11, 12][length:]]))
    torch.testing.assert_close(a[:, :length], b[:, :length])


def test_sasrec_every_position_reads_each_prefix_causally() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=20, max_len=5, dim=16, dropout=0.0)).eval()
    rows = torch.tensor([[0, 3, 5, 7, 9], [2, 4, 6, 8, 1]])
    every = model.queries_every_position(torch.zeros(2, dtype=torch.long), rows)
    for t in range(rows.shape[1]):  # each prefix, exactly as a profile of its own
        torch.testing.assert_close(
            every[:, t], model.queries(torch.zeros(2), rows[:, : t + 1]), rtol=1e-5, atol=1e-6
        )
    changed = rows.clone()
    changed[:, 3:] = 11  # later items change nothing before them
    again = model.queries_every_position(torch.zeros(2, dtype=torch.long), changed)
    torch.testing.assert_close(again[:, :3], every[:, :3])
