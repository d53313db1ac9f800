"""The cold-item protocol: items held out entirely, and metrics over several targets a user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.offline.cold import cold_split, multi_target_metrics
from service.offline.data import load_dataset


def test_held_out_items_never_reach_the_warm_data_and_are_each_users_targets(
    ml100k: Path,
) -> None:
    data = load_dataset(ml100k, check_images=False)
    split = cold_split(data, np.random.default_rng(0))
    held = np.concatenate([split.validation_items, split.test_items])
    assert len(held) == round(0.2 * len(np.unique(data.items)))  # 333 of 1,667
    assert abs(len(split.validation_items) - len(split.test_items)) <= 1
    assert not set(split.validation_items) & set(split.test_items)
    # The warm data: every other item, renumbered in items.csv order, and all of its rows
    warm = split.warm
    assert warm.n_items == data.n_items - len(held)
    assert warm.item_ids.tolist() == data.item_ids[split.warm_items - 1].tolist()
    assert not set(data.item_ids[held - 1]) & set(warm.item_ids[warm.items - 1])
    assert len(warm.users) + np.isin(data.items, held).sum() == len(data.users)
    # Targets: exactly the held-out test items each user chose; profile: last 9 warm items
    raw = data.item_ids
    for row in (0, len(split.test.users) // 2, len(split.test.users) - 1):
        user = split.test.users[row]
        mine = data.items[data.users == user]
        chosen = raw[split.test_items[split.test.targets[row]] - 1]
        assert sorted(chosen) == sorted(raw[mine[np.isin(mine, split.test_items)] - 1])
        order = np.lexsort(
            (np.flatnonzero(data.users == user), data.timestamps[data.users == user])
        )
        in_time = mine[order]
        last_warm = raw[in_time[~np.isin(in_time, held)] - 1][-9:]
        profile = split.test.profiles[row]
        assert warm.item_ids[profile[profile > 0] - 1].tolist() == last_warm.tolist()
    again = cold_split(data, np.random.default_rng(0))
    assert again.test_items.tolist() == split.test_items.tolist()  # the generator decides
    other = cold_split(data, np.random.default_rng(1))
    assert other.test_items.tolist() != split.test_items.tolist()


def test_metrics_over_several_targets_count_ties_against_the_model() -> None:
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4]])
    targets = (np.array([1, 3]), np.array([3, 2]))
    at_two = multi_target_metrics(scores, targets, k=2)
    # user 0: item 1 ties with item 2, so ranks third; user 1: both targets on top
    assert at_two["R@2"].tolist() == [0.0, 1.0]
    assert at_two["nDCG@2"][1] == pytest.approx(1.0)
    at_three = multi_target_metrics(scores, targets, k=3)
    assert at_three["R@3"][0] == 0.5
    ideal = 1 + 1 / np.log2(3)
    assert at_three["nDCG@3"][0] == pytest.approx((1 / np.log2(4)) / ideal)
    flat = multi_target_metrics(np.zeros((1, 50)), (np.array([7]),), k=20)
    assert flat["R@20"].tolist() == [0.0]  # all tied: the worst place, not a lucky one
