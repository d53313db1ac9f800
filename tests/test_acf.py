"""ACF model invariants, for every combination of the paper's options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from service.model.acf import ACF, PAD, UNKNOWN_USER, ACFConfig
from service.model.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

N_USERS, N_ITEMS, K, C = 7, 12, 49, 24
BASE = ACFConfig(n_users=N_USERS, n_items=N_ITEMS, feature_dim=C, dim=8, attention_dim=6)
VARIANTS = [
    BASE,
    replace(BASE, tied=False),
    replace(BASE, item_term=True),
    replace(BASE, item_bias=True, score_scale=0.5),
    replace(BASE, component_pool="mean"),
]


def _model(config: ACFConfig, seed: int = 0) -> ACF:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ACF(config, torch.randn(N_ITEMS, K, C, generator=g)).eval()
    with torch.no_grad():  # non-zero biases, so a forgotten bias term shows up
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for emb in (model.item_embedding, model.profile_embedding):
            emb.weight[PAD].zero_()
    return model


PROFILES = torch.tensor([[3, 5, 7, 0], [1, 0, 0, 0], [2, 4, 6, 8], [0, 0, 0, 0]])
USERS = torch.tensor([0, 3, 6, 2])


@pytest.fixture(
    params=VARIANTS,
    ids=lambda c: f"tied={c.tied},W1v={c.item_term},bias={c.item_bias},pool={c.component_pool}",
)
def model(request: pytest.FixtureRequest) -> ACF:
    return _model(request.param)


def test_shapes_and_attention_sums(model: ACF) -> None:
    out = model.attend(USERS, PROFILES, model.catalogue_tables())
    assert out.user.shape == (4, 8)
    assert out.item_attention.shape == (4, 4)
    assert out.component_attention.shape == (4, 4, K)
    mask = PROFILES != PAD
    sums = out.item_attention.sum(-1)
    torch.testing.assert_close(sums[:3], torch.ones(3))
    assert sums[3] == 0  # an empty profile attends to nothing (and gives no NaN)
    comp = out.component_attention.sum(-1)
    torch.testing.assert_close(comp[mask], torch.ones(int(mask.sum())))
    assert torch.all(comp[~mask] == 0)
    assert torch.all(out.item_attention[~mask] == 0)
    assert model.score_all(USERS, PROFILES).shape == (4, N_ITEMS)


def test_empty_profile_gives_the_plain_user_embedding(model: ACF) -> None:
    out = model.attend(USERS[3:], PROFILES[3:], model.catalogue_tables())
    torch.testing.assert_close(out.user, model.user_embedding(USERS[3:]))


def test_padded_positions_change_nothing(model: ACF) -> None:
    tables = model.catalogue_tables()
    base = model.attend(USERS[:1], PROFILES[:1], tables)
    moved = model.attend(USERS[:1], torch.tensor([[0, 3, 0, 5, 0, 7]]), tables)
    torch.testing.assert_close(moved.user, base.user)
    # garbage in the padding row of the tables must not leak into any output
    poisoned = type(tables)(tables.reduced.clone(), tables.keys.clone())
    poisoned.reduced[PAD] = 1e3
    poisoned.keys[PAD] = -1e3
    torch.testing.assert_close(
        model.attend(USERS, PROFILES, poisoned).user, model.attend(USERS, PROFILES, tables).user
    )


def test_profile_order_does_not_matter(model: ACF) -> None:
    tables = model.catalogue_tables()
    a = model.attend(USERS[2:3], torch.tensor([[2, 4, 6, 8]]), tables).user
    b = model.attend(USERS[2:3], torch.tensor([[8, 2, 6, 4]]), tables).user
    torch.testing.assert_close(a, b)


def test_batch_equals_one_at_a_time(model: ACF) -> None:
    batched = model.score_all(USERS, PROFILES)
    for i in range(len(USERS)):
        length = int((PROFILES[i] != PAD).sum()) or 1
        single = model.score_all(USERS[i : i + 1], PROFILES[i : i + 1, :length])
        torch.testing.assert_close(single[0], batched[i], rtol=1e-5, atol=1e-6)


def test_forward_scores_match_score_all(model: ACF) -> None:
    pos, neg = torch.tensor([1, 2, 3, 12]), torch.tensor([12, 11, 4, 1])
    p, n = model(USERS, PROFILES, pos, neg)
    full = model.score_all(USERS, PROFILES)
    rows = torch.arange(4)
    torch.testing.assert_close(p, full[rows, pos - 1])
    torch.testing.assert_close(n, full[rows, neg - 1])


def test_inner_product_over_item_vectors_is_the_model_score(model: ACF) -> None:
    user = model.attend(USERS, PROFILES, model.catalogue_tables()).user
    by_index = model.query_vectors(user) @ model.item_vectors().T
    items = torch.arange(1, N_ITEMS + 1)
    direct = torch.stack([model.score_items(user, items.new_full((4,), j)) for j in items], 1)
    torch.testing.assert_close(by_index, direct)


def test_tutorial_way_of_reducing_gives_the_same_user(model: ACF) -> None:
    """Reducing each sample's raw profile features from scratch (the tutorial's way) is the
    same computation as reducing the catalogue once; only the cost differs."""
    per_sample = model.encode_items(model.features[PROFILES.flatten()])
    rows = torch.arange(PROFILES.numel()).view(PROFILES.shape)
    a = model.attend(USERS, PROFILES, per_sample, rows=rows).user
    b = model.attend(USERS, PROFILES, model.catalogue_tables()).user
    torch.testing.assert_close(a, b)


def test_gradients_reach_every_parameter() -> None:
    model = _model(replace(BASE, tied=False, item_term=True, item_bias=True)).train()
    p, n = model(USERS, PROFILES, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    (n - p).sum().backward()
    missing = [
        name
        for name, prm in model.named_parameters()
        if prm.grad is None or not prm.grad.abs().sum() > 0
    ]
    assert missing == []


def test_checkpoint_round_trip_gives_identical_scores(model: ACF, tmp_path: Path) -> None:
    ckpt = Checkpoint(
        config=model.config,
        state=model.state_dict(),
        user_ids=list(range(100, 100 + N_USERS)),
        item_ids=list(range(1, N_ITEMS + 1)),
        features={"backbone": "test", "inputs_hash": "abc"},
        validation={"nDCG@20": 0.5},
    )
    save_checkpoint(tmp_path / "m.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == model.config
    assert loaded.user_ids == ckpt.user_ids
    assert loaded.validation == {"nDCG@20": 0.5}
    rebuilt = loaded.build_model(model.features[1:], inputs_hash="abc", item_ids=ckpt.item_ids)
    torch.testing.assert_close(
        rebuilt.score_all(USERS, PROFILES), model.score_all(USERS, PROFILES), rtol=0, atol=0
    )
    with pytest.raises(CheckpointError, match="do not match"):
        loaded.build_model(model.features[1:], inputs_hash="other", item_ids=ckpt.item_ids)
    with pytest.raises(CheckpointError, match="order"):
        loaded.build_model(
            model.features[1:], inputs_hash="abc", item_ids=list(reversed(ckpt.item_ids))
        )


def test_features_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        ACF(BASE, torch.zeros(N_ITEMS + 1, K, C))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_overlapping_profiles_of_one_user_match_one_at_a_time(model: ACF) -> None:
    """Distinct (user, item) pairs are computed once per batch; that must not change results."""
    users = torch.tensor([1, 1, 1, 2, 1])
    profiles = torch.tensor([[3, 5, 7, 0], [5, 7, 9, 0], [7, 9, 11, 3], [3, 5, 7, 0], [0, 0, 0, 0]])
    tables = model.catalogue_tables()
    batched = model.attend(users, profiles, tables)
    for i in range(len(users)):
        single = model.attend(users[i : i + 1], profiles[i : i + 1], tables)
        torch.testing.assert_close(single.user[0], batched.user[i])
        torch.testing.assert_close(single.item_attention[0], batched.item_attention[i])
        torch.testing.assert_close(single.component_attention[0], batched.component_attention[i])


def test_an_unknown_user_is_their_profile_alone(model: ACF) -> None:
    tables = model.catalogue_tables()
    unknown = torch.tensor([UNKNOWN_USER, UNKNOWN_USER, 0])
    profiles = torch.tensor([[3, 5, 0], [0, 0, 0], [3, 5, 0]])
    out = model.attend(unknown, profiles, tables)
    assert torch.all(out.user[1] == 0)  # no embedding, no profile: nothing to go on
    expected = (out.item_attention[0].unsqueeze(-1) * model.profile_embedding(profiles[0])).sum(0)
    torch.testing.assert_close(out.user[0], expected)
    assert not torch.allclose(out.user[0], out.user[2])  # user 0's own embedding counts
