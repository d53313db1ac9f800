"""ACF model invariants, for every combination of the paper's options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from service.model.acf import ACF, ITEM_ROWS, PAD, UNKNOWN_USER, ACFConfig
from service.model.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from service.model.tags import item_tags, tag_rows, vocabulary

N_USERS, N_ITEMS, K, C = 7, 12, 49, 24
BASE = ACFConfig(n_users=N_USERS, n_items=N_ITEMS, feature_dim=C, dim=8, attention_dim=6)
VARIANTS = [
    BASE,
    replace(BASE, tied=False),
    replace(BASE, item_term=True),
    replace(BASE, item_bias=True, score_scale=0.5),
    replace(BASE, component_pool="mean"),
    replace(BASE, visual="score", item_bias=True, score_scale=1.0),
    replace(BASE, visual="score", component_pool="mean", tied=False),
    replace(BASE, visual="none", item_bias=True),
    replace(BASE, visual="score", recency=3, item_bias=True),
    replace(BASE, visual="score", newest=True, item_bias=True),
    replace(BASE, visual="score", item_pool="attention", newest=True, item_bias=True),
    replace(BASE, visual="score", context_blocks=2, positions=4, newest=True, item_bias=True),
    replace(BASE, visual="score", users=False, recency=3, item_bias=True),
    replace(BASE, visual="score", item_bias=True, recency=3, tags=("comedy", "drama", "horror")),
]
ORDER_BLIND = [c for c in VARIANTS if not (c.recency or c.newest or c.context_blocks)]


def _model(config: ACFConfig, seed: int = 0) -> ACF:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tags = None
    if config.tags:  # every item with one or two of them
        first = torch.randint(len(config.tags), (N_ITEMS,), generator=g).tolist()
        second = torch.randint(len(config.tags), (N_ITEMS,), generator=g).tolist()
        tags = tag_rows(
            config.tags,
            [{config.tags[a], config.tags[b]} for a, b in zip(first, second, strict=True)],
        )
    model = ACF(config, torch.randn(N_ITEMS, K, C, generator=g), tags).eval()
    with torch.no_grad():  # non-zero biases, so a forgotten bias term shows up
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for emb in (model.item_embedding, model.profile_embedding):
            emb.weight[PAD].zero_()
    return model


PROFILES = torch.tensor([[3, 5, 7, 0], [1, 0, 0, 0], [2, 4, 6, 8], [0, 0, 0, 0]])
USERS = torch.tensor([0, 3, 6, 2])


def _name(c: ACFConfig) -> str:
    return (
        f"visual={c.visual},tied={c.tied},W1v={c.item_term},bias={c.item_bias},"
        f"pool={c.component_pool},item_pool={c.item_pool},recency={c.recency},newest={c.newest},"
        f"context={c.context_blocks},users={c.users},tags={len(c.tags)}"
    )


@pytest.fixture(params=VARIANTS, ids=_name)
def model(request: pytest.FixtureRequest) -> ACF:
    return _model(request.param)


@pytest.fixture(params=ORDER_BLIND, ids=_name)
def order_blind(request: pytest.FixtureRequest) -> ACF:
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
    expected = 1.0 if model.uses_images else 0.0  # no image, nothing to attend to
    torch.testing.assert_close(comp[mask], torch.full((int(mask.sum()),), expected))
    assert torch.all(comp[~mask] == 0)
    assert torch.all(out.item_attention[~mask] == 0)
    assert model.score_all(USERS, PROFILES).shape == (4, N_ITEMS)


def test_empty_profile_gives_the_plain_user_embedding(model: ACF) -> None:
    out = model.attend(USERS[3:], PROFILES[3:], model.catalogue_tables())
    expected = (
        model.user_embedding(USERS[3:])
        if model.user_embedding is not None
        else torch.zeros(1, model.config.dim)
    )
    torch.testing.assert_close(out.user, expected)


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


def test_profile_order_does_not_matter_without_recency(order_blind: ACF) -> None:
    tables = order_blind.catalogue_tables()
    a = order_blind.attend(USERS[2:3], torch.tensor([[2, 4, 6, 8]]), tables).user
    b = order_blind.attend(USERS[2:3], torch.tensor([[8, 2, 6, 4]]), tables).user
    torch.testing.assert_close(a, b)


def test_context_blocks_read_the_order_of_the_profile() -> None:
    """Without recency or the newest item, only the context blocks can tell an order."""
    model = _model(replace(BASE, visual="score", context_blocks=1, positions=4))
    with torch.no_grad():  # positions made to differ (they start at zero, order-blind)
        model.context.position.weight.normal_()  # type: ignore[union-attr]
    tables = model.catalogue_tables()
    a = model.attend(USERS[2:3], torch.tensor([[2, 4, 6, 8]]), tables)
    b = model.attend(USERS[2:3], torch.tensor([[8, 2, 6, 4]]), tables)
    assert not torch.allclose(a.user, b.user)
    # The explanation is still one weight per profile item, after context
    torch.testing.assert_close(a.item_attention.sum(-1), torch.ones(1))


def test_recency_makes_the_newest_items_count_by_position() -> None:
    model = _model(replace(BASE, recency=4))
    with torch.no_grad():  # the newest position strongly preferred, whatever the item
        model.recency.weight.zero_()  # type: ignore[union-attr]
        model.recency.weight[0] = 5.0 * model.item_out.weight[0].sign()  # type: ignore[union-attr]
    tables = model.catalogue_tables()
    for profile in ([2, 4, 6, 8], [8, 2, 6, 4], [0, 4, 0, 6]):
        out = model.attend(USERS[2:3], torch.tensor([profile]), tables)
        newest = max(i for i, item in enumerate(profile) if item != PAD)
        assert int(out.item_attention[0].argmax()) == newest


def test_every_position_is_attention_over_each_prefix_of_the_row(model: ACF) -> None:
    """One pass over a row gives, at every position t, the user vector of the profile
    rows[:, :t+1] (padding anywhere, as profile dropout leaves it)."""
    rows = torch.tensor([[0, 3, 5, 7, 9], [2, 4, 0, 6, 8], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    users = torch.tensor([0, 3, UNKNOWN_USER, 2])
    every = model.attend_every_position(users, rows)
    tables = model.catalogue_tables()
    for t in range(rows.shape[1]):
        window = model.attend(users, rows[:, : t + 1], tables).user
        torch.testing.assert_close(every[:, t], window, rtol=1e-5, atol=1e-6)


AGED = replace(
    BASE, visual="score", recency=5, newest=True, context_blocks=1, positions=5, ages=True
)
DAY = 86_400


def _aged() -> ACF:
    model = _model(AGED)
    with torch.no_grad():  # ages made to matter (they start at zero, as recency)
        model.age.weight.normal_()  # type: ignore[union-attr]
    return model


def test_every_position_with_ages_is_attention_over_each_prefix_with_its_times() -> None:
    """Position t's items are aged from t's own item, as a profile ending at t ages them."""
    model = _aged()
    rows = torch.tensor([[0, 3, 5, 7, 9], [2, 4, 0, 6, 8], [0, 0, 0, 0, 1]])
    times = torch.tensor(
        [[0, 5, 90, 40 * DAY, 40 * DAY + 3], [0, 2 * DAY, 0, 9 * DAY, 9 * DAY], [0, 0, 0, 0, 7]]
    )
    users = torch.tensor([0, 3, UNKNOWN_USER])
    every = model.attend_every_position(users, rows, times)
    tables = model.catalogue_tables()
    for t in range(rows.shape[1]):
        window = model.attend(users, rows[:, : t + 1], tables, times=times[:, : t + 1]).user
        torch.testing.assert_close(every[:, t], window, rtol=1e-5, atol=1e-6)


def test_ages_count_back_from_the_newest_item_not_from_a_clock() -> None:
    model = _aged()
    tables = model.catalogue_tables()
    profile, times = torch.tensor([[2, 4, 6, 8]]), torch.tensor([[0, 30, 2 * DAY, 2 * DAY + 9]])
    base = model.attend(USERS[2:3], profile, tables, times=times)
    later = model.attend(USERS[2:3], profile, tables, times=times + 10**9)
    torch.testing.assert_close(later.user, base.user)
    one_visit = model.attend(USERS[2:3], profile, tables, times=torch.tensor([[0, 5, 9, 20]]))
    assert not torch.allclose(one_visit.item_attention, base.item_attention)


def test_items_of_an_earlier_visit_weigh_as_their_age_says() -> None:
    """Ages over a month drawing the weight away: the same two items weigh next to nothing
    when they came a month before the newest, and their share when they came with it."""
    model = _model(AGED)
    with torch.no_grad():
        model.age.weight[-1] = -20.0 * model.item_out.weight[0].sign()  # type: ignore[union-attr]
    tables, profile = model.catalogue_tables(), torch.tensor([[2, 4, 6, 8]])
    month = torch.tensor([[0, 10, 40 * DAY, 40 * DAY + 5]])
    old = model.attend(USERS[2:3], profile, tables, times=month).item_attention[0]
    together = model.attend(USERS[2:3], profile, tables, times=month % DAY).item_attention[0]
    assert float(old[:2].sum().detach()) < 1e-3 < float(together[:2].sum().detach())


def test_a_model_that_reads_ages_refuses_profiles_without_their_times() -> None:
    model = _aged()
    with pytest.raises(ValueError, match="times"):
        model.score_all(USERS, PROFILES)
    with pytest.raises(ValueError, match="times"):
        model.attend_every_position(USERS, PROFILES, torch.zeros(len(USERS), 2))


def test_batch_equals_one_at_a_time(model: ACF) -> None:
    batched = model.score_all(USERS, PROFILES)
    for i in range(len(USERS)):
        length = int((PROFILES[i] != PAD).sum()) or 1
        single = model.score_all(USERS[i : i + 1], PROFILES[i : i + 1, :length])
        torch.testing.assert_close(single[0], batched[i], rtol=1e-5, atol=1e-6)


def test_queries_match_the_whole_catalogue_way(model: ACF) -> None:
    """``queries`` encodes only the batch's distinct profile items; the same user vectors
    come out of the catalogue's tables."""
    user = model.attend(USERS, PROFILES, model.catalogue_tables()).user
    torch.testing.assert_close(model.queries(USERS, PROFILES), model.query_vectors(user))


def test_item_vectors_of_some_items_are_rows_of_all(model: ACF) -> None:
    items = torch.tensor([5, 1, 12, 5])
    torch.testing.assert_close(model.item_vectors(items), model.item_vectors()[items - 1])


def test_a_new_item_starts_from_the_given_rows_and_is_scored_with_its_image(model: ACF) -> None:
    """Items added while serving: the grown model keeps every trained row, and a new item's
    vector is its starting rows plus its image vector."""
    rows = {
        name: torch.randn(2, *p.shape[1:])
        for name, p in model.state_dict().items()
        if name in ITEM_ROWS
    }
    if model.config.tied:  # one parameter under two names: one row for both
        rows["profile_embedding.weight"] = rows["item_embedding.weight"]
    grown = model.with_new_items(rows)
    assert grown.config.n_items == N_ITEMS + 2 and len(grown.features) == 0  # no features held
    torch.testing.assert_close(
        grown.attend(USERS, PROFILES, model.catalogue_tables()).user,
        model.attend(USERS, PROFILES, model.catalogue_tables()).user,
    )
    new = torch.tensor([N_ITEMS + 1, N_ITEMS + 2])
    torch.testing.assert_close(grown.profile_embedding(new), rows["profile_embedding.weight"])
    if model.config.visual != "score":
        with pytest.raises(ValueError, match="cannot score new items"):
            model.image_vectors(model.features[1:3])
        return
    image = model.image_vectors(model.features[1:3])
    expected = (rows["item_embedding.weight"] + image) * model.config.scale
    vectors = grown.vectors_with_image(new, image)
    torch.testing.assert_close(vectors[:, : model.config.dim], expected)
    # an item's own image gives its own image vector: trained items go through the same map
    torch.testing.assert_close(
        model.vectors_with_image(torch.tensor([1, 2]), image), model.item_vectors()[:2]
    )


def test_an_attention_pooled_item_image_is_what_an_unknown_users_profile_pools() -> None:
    """``item_pool="attention"``: a candidate is scored by the image vector that the component
    attention of a user the model knows nothing of pools from it as a profile item."""
    model = _model(replace(BASE, visual="score", item_pool="attention"))
    items = torch.arange(1, N_ITEMS + 1)
    alone = model.attend(  # one profile item, so its item weight is 1: user = p + x̄
        torch.full((N_ITEMS,), UNKNOWN_USER), items[:, None], model.catalogue_tables()
    )
    image = model.image_vectors(model.features[1:])
    torch.testing.assert_close(image, alone.user - model.profile_embedding(items))
    torch.testing.assert_close(
        model.item_vectors(), model.vectors_with_image(items, image), msg="scored as it pools"
    )
    mean = model.reduce(model.features[1:].mean(1))
    assert not torch.allclose(image, mean, atol=1e-3)
    ablation = ACF(replace(model.config, component_pool="mean"), model.features[1:])
    ablation.load_state_dict(model.state_dict())  # the mean-pool ablation pools items by means
    torch.testing.assert_close(ablation.image_vectors(model.features[1:]), mean)


def test_tutorial_way_of_reducing_gives_the_same_user(model: ACF) -> None:
    """Reducing each sample's raw profile features from scratch (the tutorial's way) is the
    same computation as reducing the catalogue once; only the cost differs."""
    per_sample = model.encode_items(model.features[PROFILES.flatten()])
    rows = torch.arange(PROFILES.numel()).view(PROFILES.shape)
    a = model.attend(USERS, PROFILES, per_sample, rows=rows).user
    b = model.attend(USERS, PROFILES, model.catalogue_tables()).user
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("visual", "context", "tags"),
    [("attention", 0, ()), ("score", 0, ()), ("score", 2, ()), ("score", 0, ("a", "b"))],
)
def test_gradients_reach_every_parameter(visual: str, context: int, tags: tuple[str, ...]) -> None:
    config = replace(
        BASE,
        tied=False,
        item_term=True,
        item_bias=True,
        recency=4,
        newest=True,
        visual=visual,  # type: ignore[arg-type]
        context_blocks=context,
        positions=4,
        tags=tags,
    )
    model = _model(config).train()
    scores = model.queries(USERS, PROFILES) @ model.item_vectors().T
    scores.logsumexp(-1).sum().backward()
    # The attention logits' output biases (c1, c2) shift every logit of a softmax alike, so
    # they have no gradient in exact arithmetic (float noise may give them one).
    softmax_shifts = {"item_out.bias", "comp_out.bias"}
    missing = [
        name
        for name, prm in model.named_parameters()
        if name not in softmax_shifts and (prm.grad is None or not prm.grad.abs().sum() > 0)
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
    if model.user_embedding is None:  # everyone is their profile alone
        torch.testing.assert_close(out.user[0], out.user[2])
        return
    assert not torch.allclose(out.user[0], out.user[2])  # user 0's own embedding counts
    if model.context is not None:  # the pooled items are contextualised: no closed form
        return
    content = model.profile_embedding(profiles[0])  # (L, D)
    if model.tag_embedding is not None:  # an item's genres are part of it on both sides
        content = content + model.tag_embedding(model.item_tags[profiles[0]])
    if model.config.visual == "score":  # the attended image content is part of each item
        beta = out.component_attention[0]  # (L, K)
        content = content + (beta.unsqueeze(1) @ tables.reduced[profiles[0]]).squeeze(1)
    expected = (out.item_attention[0].unsqueeze(-1) * content).sum(0)
    torch.testing.assert_close(out.user[0], expected)


def test_tags_are_weights_summing_to_one_over_the_known_vocabulary() -> None:
    rows = tag_rows(("comedy", "drama", "horror"), [{"drama"}, {"horror", "comedy"}, {"noir"}, ()])
    assert rows.tolist() == [[0, 1, 0], [0.5, 0, 0.5], [0, 0, 0], [0, 0, 0]]


def test_a_title_gives_its_words_and_decade_and_only_shared_ones_are_read() -> None:
    toy = item_tags("Toy Story (1995)", ["Animation", "Comedy"])
    assert toy == {"Animation", "Comedy", "word:toy", "word:story", "word:1995", "decade:1990s"}
    assert item_tags("M (1931)", []) == {"word:1931", "decade:1930s"}  # "m" is no word
    assert item_tags("", ["", "Drama"]) == {"Drama"}
    scream = item_tags("Scream 2 (1997)", ["Horror"])
    tags = [toy, scream, item_tags("Toy Soldiers (1991)", ["Drama"])]
    assert vocabulary(tags, titles=False) == ("Animation", "Comedy", "Drama", "Horror")
    assert vocabulary(tags, titles=True) == (
        "Animation",
        "Comedy",
        "Drama",
        "Horror",
        "decade:1990s",
        "word:toy",
    )


def test_an_items_genres_reach_its_vector_on_both_sides() -> None:
    """Two items alike in everything but their genres are scored and read apart."""
    model = _model(replace(BASE, visual="score", tags=("comedy", "horror")))
    with torch.no_grad():
        model.item_embedding.weight[2] = model.item_embedding.weight[1]
        model.features[2] = model.features[1]
        model.pooled[2] = model.pooled[1]
        model.item_tags[1:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vectors = model.item_vectors(torch.tensor([1, 2]))
    shift = (
        model.tag_embedding.weight[:, 0] - model.tag_embedding.weight[:, 1]
    ) * model.config.scale  # type: ignore[union-attr]
    torch.testing.assert_close(vectors[0] - vectors[1], shift)
    users = torch.tensor([0, 0])
    read = model.queries(users, torch.tensor([[5, 1], [5, 2]]))
    assert not torch.allclose(read[0], read[1])
