"""The cold-item protocol: items held out entirely, and metrics over several targets a user."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.acf import ACF
from service.model.feature_store import load_features
from service.offline.data.dataset import leave_last_out, load_dataset
from service.offline.data.synthetic import World
from service.offline.evaluation.evaluate import holdout_task
from service.offline.experiments.cold import (
    cold_split,
    genre_scores,
    image_scores,
    mixed_ranking,
    multi_target_metrics,
    profile_items,
    random_scores,
    run_cold,
    served_scores,
    text_scores,
    warm_prepared,
)
from service.offline.experiments.cold_page import cold_section
from service.offline.experiments.plan import ColdPlan, Plan, Row
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, fit
from service.offline.training.runner import Runner


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


def test_metadata_and_image_scores_are_what_they_say(ml100k: Path) -> None:
    data = load_dataset(ml100k, check_images=False)
    split = cold_split(data, np.random.default_rng(0))
    part, candidates = split.test, split.test_items
    genres = genre_scores(split, part, candidates, data.genres, np.random.default_rng(0))
    assert genres.shape == (len(part.users), len(candidates))
    profile = profile_items(split, part)[0]
    item = candidates[5]
    shares = [np.mean([g in data.genres[i - 1] for i in profile]) for g in data.genres[item - 1]]
    assert genres[0, 5] == pytest.approx(np.mean(shares))
    # Films sharing a genre set tie; the ties are broken at random, not against the target
    assert len(np.unique(genres[0].round(6))) < len(candidates) / 2
    assert len(np.unique(genres[0])) == len(candidates)
    rng = np.random.default_rng(1)
    features = rng.normal(size=(data.n_items, 4, 3)).astype(np.float16)
    images = image_scores(split, part, candidates, features)
    pooled = features.astype(np.float32).mean(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    mean = pooled[profile - 1].mean(0)
    assert images[0, 5] == pytest.approx(mean @ pooled[item - 1] / np.linalg.norm(mean), abs=1e-5)


def test_the_text_baseline_ranks_by_shared_rare_words(ml100k: Path) -> None:
    data = load_dataset(ml100k, check_images=False)
    split = cold_split(data, np.random.default_rng(0))
    part, candidates = split.test, split.test_items
    profile = profile_items(split, part)[0]
    texts = ["" for _ in data.titles]
    texts[profile[-1] - 1] = "zebra quartet"  # one profile item's words
    a, b, c, d = candidates[:4]
    texts[a - 1] = "zebra quartet"  # both of them
    texts[b - 1] = "zebra"  # one of them
    texts[c - 1] = "zebra quartet and the"  # both, and words common elsewhere
    texts[d - 1] = "the quartet"  # one, and a common word
    for i in range(4, 40):  # "the" and "and" are common
        texts[candidates[i] - 1] = "the and"
    scores = text_scores(split, part, candidates, texts, np.random.default_rng(0))[0]
    assert scores[0] == pytest.approx(1.0) and scores[0] > scores[2] > scores[1] > scores[3]
    assert abs(scores[4]) < 1e-6  # no word in common: only the tie-breaking noise
    assert len(np.unique(scores)) == len(candidates)  # ties broken


def test_held_out_items_added_as_the_service_adds_them_reach_users_of_their_kind(
    world: World, world_features: tuple[Path, np.ndarray]
) -> None:
    """Known answer: in the synthetic world a user's items are mostly of one kind, which only
    the image shows. ACF trained without the held-out items, which are added after training
    through the serving code, ranks them for the users who chose them well above chance."""
    data = load_dataset(world.root)
    split = cold_split(data, np.random.default_rng(0), share=0.4)  # 40 items to rank
    features, meta = world_features[1], load_features(world_features[0])[1]
    warm = warm_prepared(Prepared(data, leave_last_out(data), features, meta), split)
    config = TrainConfig(dim=16, attention_dim=16, epochs=4, batch_size=128, lr=1e-2)
    result = fit(warm, config, device=torch.device("cpu"), progress=False)
    assert isinstance(result.model, ACF)
    part, candidates = split.test, split.test_items
    scores = served_scores(
        result.model, result.projection, part, candidates, features, device=torch.device("cpu")
    )
    assert scores.shape == (len(part.users), split.warm.n_items + len(candidates))
    acf = multi_target_metrics(scores[:, split.warm.n_items :], part.targets, k=5)["R@5"]
    chance = multi_target_metrics(
        random_scores(part, candidates, np.random.default_rng(0)), part.targets, k=5
    )["R@5"]
    assert acf.mean() > 1.5 * chance.mean(), (acf.mean(), chance.mean())


def test_the_mixed_ranking_removes_what_users_saw_and_measures_exposure(ml100k: Path) -> None:
    data = load_dataset(ml100k, check_images=False)
    split = cold_split(data, np.random.default_rng(0))
    part, n_warm = split.test, split.warm.n_items
    scores = np.zeros((len(part.users), n_warm + len(split.test_items)))
    scores[:, n_warm:] = 1.0  # every held-out item above every warm one
    flooded = mixed_ranking(split, part, scores)
    assert flooded.shown.tolist() == [1.0] * len(part.users) and flooded.exposure > 2
    # the warm items a user chose score highest, but they are removed from their ranking
    scores = np.zeros_like(scores)
    for row, user in enumerate(part.users.tolist()):
        scores[row, split.warm.items[split.warm.users == user] - 1] = 5.0
        scores[row, n_warm + part.targets[row]] = 1.0  # then their held-out items
    found = mixed_ranking(split, part, scores)
    few = np.array([len(t) <= 20 for t in part.targets])
    assert np.all(found.metrics["R@20"][few] == 1.0)
    mine = data.items[data.users == part.users[0]]
    held = np.concatenate([split.validation_items, split.test_items])
    tested, warm = np.isin(mine, split.test_items).sum(), (~np.isin(mine, held)).sum()
    assert found.chosen[0] == pytest.approx(tested / (tested + warm))


def test_the_protocol_run_ranks_trained_rows_three_ways_and_baselines_cold_only(
    world: World, world_features: tuple[Path, np.ndarray]
) -> None:
    features, meta = world_features[1], load_features(world_features[0])[1]
    data = load_dataset(world.root)
    prepared = Prepared(data, leave_last_out(data), features, meta)
    small = TrainConfig(dim=16, attention_dim=16, epochs=3, batch_size=128, lr=1e-2)
    cold = ColdPlan(("acf", "acf_item_dropout"), share=0.4)
    plan = Plan(
        rows=(Row("acf", small), Row("acf_item_dropout", replace(small, item_dropout=0.5))),
        seeds=(0,),
        n_resamples=50,
        cold=cold,
    )
    c = run_cold(prepared, plan, runner=Runner(torch.device("cpu"), progress=False))
    names = [r.name for r in c.rows]
    assert names[-2:] == ["acf", "acf_item_dropout"] and names[:2] == ["random", "image only"]
    for ranking in ("all", "warm"):  # baselines cannot rank the warm items beside the cold
        assert set(c.summary[ranking]) == {"acf", "acf_item_dropout"}
    assert set(c.summary["cold"]) == set(names)
    assert set(c.diffs["cold"]) == set(names) - {"acf"}
    split = cold_split(data, np.random.default_rng(0), share=0.4)  # the plan's draw
    assert (c.test_users, c.test_items) == (len(split.test.users), len(split.test_items))
    assert c.warm_items == split.warm.n_items
    warm_users = len(holdout_task(warm_prepared(prepared, split).split, "standard").users)
    acf = next(r for r in c.rows if r.name == "acf")
    assert len(acf.tables["warm"][0]["R@20"]) == warm_users
    assert len(acf.tables["cold"][0]["R@20"]) == c.test_users
    assert acf.exposure[0] > 0 and 0 < c.target_share < 1
    for row in c.rows:
        iv = c.summary["cold"][row.name]["R@20"]
        assert iv.low <= iv.mean <= iv.high
        assert 0 <= row.validation[0] <= 1
    page = "\n".join(cold_section(c, cold))
    assert "| `acf_item_dropout` |" in page and "x as often as users chose them" in page
    assert "`acf` − `acf_item_dropout`: cold-only nDCG@20" in page
