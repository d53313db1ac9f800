"""The serving path (precomputed tables + FAISS) ranks as the trained model does: exactly with
float32 tables, within float16 rounding with the default ones, from memory or from disk."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine import build_engine
from service.index.item_index import ItemIndex
from service.model.acf import ACF, UNKNOWN_USER, ACFConfig, Visual
from service.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from service.model.sasrec import SASRec, SASRecConfig
from service.model.serving import (
    NEIGHBOURS,
    NEW_ITEM_LENGTH,
    NEW_ITEM_LENGTH_BY_TAGS,
    ServingModel,
)
from service.model.tables import Rows, compute_tables, read_tables, write_tables
from service.model.tags import tag_rows
from service.recommender import Query, Recommender

N_ITEMS, K, C = 40, 49, 12
CPU = torch.device("cpu")


BASE = ACFConfig(n_users=5, n_items=N_ITEMS, feature_dim=C, dim=8, attention_dim=8, item_bias=True)
SCORED = replace(BASE, visual="score")  # candidates are scored by their images too
TAGGED = replace(SCORED, tags=("comedy", "drama", "horror"))  # and by their genres


def _tags(config: ACFConfig, g: torch.Generator) -> torch.Tensor | None:
    """Random tags (1 to 3 of the vocabulary) for every item of a model with metadata."""
    if not config.tags:
        return None
    picks = torch.rand(N_ITEMS, len(config.tags), generator=g) < 0.5
    picks[:, 0] |= ~picks.any(1)
    return tag_rows(config.tags, [[config.tags[j] for j in row.nonzero()] for row in picks])


@pytest.fixture(
    params=[BASE, SCORED, replace(SCORED, item_pool="attention"), TAGGED],
    ids=["tutorial", "image-mean", "image-attention", "image-and-tags"],
)
def trained(request: pytest.FixtureRequest) -> ACF:
    config = request.param
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ACF(config, torch.randn(N_ITEMS, K, C, generator=g), _tags(config, g)).eval()
    with torch.no_grad():
        model.bias.weight[1:] = torch.randn(N_ITEMS, 1, generator=g)  # type: ignore[union-attr]
    return model


def test_index_over_served_vectors_is_the_models_full_ranking(trained: ACF) -> None:
    users = torch.tensor([0, 3, 4])
    profiles = torch.tensor([[1, 2, 3, 0], [5, 6, 7, 8], [9, 0, 0, 0]])
    with torch.no_grad():
        full = trained.score_all(users, profiles).numpy()
    serving = ServingModel.from_model(trained, device=CPU, dtype=np.float32)
    hits = ItemIndex(serving.item_vectors).search(
        serving.queries(users.numpy(), profiles.numpy()), N_ITEMS
    )
    for b in range(3):
        assert hits.items[b].tolist() == (np.argsort(-full[b], kind="stable") + 1).tolist()
        np.testing.assert_allclose(hits.scores[b], np.sort(full[b])[::-1], rtol=1e-5, atol=1e-5)
    assert trained.features.numel() == 0  # raw features were dropped after precomputing


def test_explanation_matches_the_ranking_attention(trained: ACF) -> None:
    model = ServingModel.from_model(trained, device=CPU, dtype=np.float32)
    profile = [4, 8, 15, 16]
    why = model.explain(2, profile, item=23)
    attended = model.attend(np.array([2]), np.array([profile]))
    np.testing.assert_allclose(why.item_attention, attended.item_attention[0].numpy())
    assert why.item_attention.sum() == pytest.approx(1.0)
    assert why.component_attention is not None and why.component_attention.shape == (4, 7, 7)
    np.testing.assert_allclose(why.component_attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    expected = model.queries(np.array([2]), np.array([profile]))[0] @ model.item_vectors[22]
    assert why.score == pytest.approx(float(expected), rel=1e-5)


def test_an_anonymous_history_is_served(trained: ACF) -> None:
    model = ServingModel.from_model(trained, device=CPU, dtype=np.float32)
    q = model.queries(np.array([UNKNOWN_USER]), np.array([[3, 7, 0]]))
    assert q.shape == (1, model.item_vectors.shape[1])
    assert np.all(np.isfinite(q))


def test_a_model_that_reads_ages_is_served_with_its_profile_items_times() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    aged = ACF(replace(SCORED, ages=True), torch.randn(N_ITEMS, K, C, generator=g)).eval()
    assert aged.age is not None
    with torch.no_grad():
        aged.age.weight.normal_(generator=g)  # zero at the start of training; learned after
    users, profiles = torch.tensor([0, 3]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    times = torch.tensor([[0, 30, 90_000, 90_030], [0, 10, 3_000_000, 0]])
    with torch.no_grad():
        full = aged.score_all(users, profiles, times).numpy()
    serving = ServingModel.from_model(aged, device=CPU, dtype=np.float32)
    served = serving.queries(users.numpy(), profiles.numpy(), times.numpy())
    np.testing.assert_allclose(served @ serving.item_vectors.T, full, rtol=1e-5, atol=1e-5)
    one_visit = serving.queries(users.numpy(), profiles.numpy(), np.zeros((2, 4), np.int64))
    assert np.abs(served - one_visit).max() > 1e-3
    with pytest.raises(ValueError, match="give the profile's times"):
        serving.queries(users.numpy(), profiles.numpy())

    # the engine trims a query's times with its history: an unknown item leaves with its time
    engine = Recommender(
        serving, item_ids=range(101, 101 + N_ITEMS), user_ids=[10], popularity=np.ones(N_ITEMS)
    )
    history, when = [999, 101, 102, 103, 104], [5.0, 0.0, 30.5, 90_000.0, 90_030.0]
    [timed] = engine.recommend([Query("10", history, (), k=N_ITEMS, times=when)])
    [known] = engine.recommend([Query("10", history[1:], (), k=N_ITEMS, times=when[1:])])
    [visit] = engine.recommend([Query("10", history, (), k=N_ITEMS)])
    assert timed.items == known.items
    np.testing.assert_allclose(timed.scores, known.scores, rtol=1e-6)
    first = {i: s for i, s in zip(timed.items, timed.scores, strict=True)}
    same_visit = {i: s for i, s in zip(visit.items, visit.scores, strict=True)}
    assert max(abs(first[i] - same_visit[i]) for i in first) > 1e-3
    why = engine.explain("10", history, 120, when)
    attended = serving.attend(
        np.array([0]), np.array([[1, 2, 3, 4]]), np.array([[0, 30, 90_000, 90_030]])
    )
    np.testing.assert_allclose(why.item_attention, attended.item_attention[0].numpy(), rtol=1e-6)
    assert why.score == pytest.approx(first[120], rel=1e-5)
    with pytest.raises(ValueError, match="5 history items but 4 times"):
        engine.recommend([Query("10", history, (), k=3, times=when[1:])])


def test_a_batch_of_requests_equals_one_at_a_time(trained: ACF) -> None:
    ckpt = Checkpoint(
        config=trained.config,
        state=trained.state_dict(),
        user_ids=[10, 11, 12, 13, 14],
        item_ids=list(range(101, 101 + N_ITEMS)),
        features={"inputs_hash": "h"},
        item_popularity=list(range(N_ITEMS)),
    )
    engine = Recommender.from_checkpoint(
        ckpt, ServingModel.from_model(trained, device=CPU, dtype=np.float32)
    )
    queries = [
        Query("10", [101, 105, 109], {101, 105, 109, 120}, k=5),
        Query("12", [130], set(), k=3, offset=4),
        Query(None, [102, 103], {102, 103}, k=8, offset=1),
        Query("never-seen", [], set(), k=4, offset=2),  # nothing known: popular items
    ]
    batched = engine.recommend(queries)
    for query, answer in zip(queries, batched, strict=True):
        alone = engine.recommend([query])[0]
        # A batched BLAS call may round differently from a single one (float32): the same
        # items in the same order, scores equal within rounding
        assert (alone.items, alone.fallback, alone.version) == (
            answer.items,
            answer.fallback,
            answer.version,
        )
        np.testing.assert_allclose(alone.scores, answer.scores, rtol=1e-5, atol=1e-6)
        assert len(answer.items) == query.k
        assert not set(answer.items) & set(query.exclude)
    assert [b.fallback for b in batched] == [False, False, False, True]
    assert batched[3].items == [101 + i for i in (37, 36, 35, 34)]  # most popular, from offset 2


def test_float16_tables_rank_as_the_model_within_rounding(trained: ACF) -> None:
    users, profiles = (
        np.array([0, 3, 4, 1]),
        np.array([[1, 2, 3, 0], [5, 6, 7, 8], [9, 0, 0, 0], [40, 39, 2, 11]]),
    )
    exact = ServingModel.from_model(copy_of(trained), device=CPU, dtype=np.float32)
    half = ServingModel.from_model(copy_of(trained), device=CPU)
    assert half.tables.reduced.dtype == np.float16
    q32, q16 = exact.queries(users, profiles), half.queries(users, profiles)
    np.testing.assert_allclose(q16, q32, rtol=0, atol=1e-2 * np.abs(q32).max())
    assert not np.array_equal(q16, q32)  # the rounding is real, and small
    top32 = ItemIndex(exact.item_vectors).search(q32, 10).items
    top16 = ItemIndex(half.item_vectors).search(q16, 10).items
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top32, top16, strict=True)])
    assert overlap >= 0.9


def test_tables_written_to_disk_are_mapped_and_serve_as_those_in_memory(
    trained: ACF, tmp_path: Path
) -> None:
    trained = copy_of(trained, visual="score")  # a model that keeps image vectors too
    features = trained.features[1:].clone()
    in_memory = compute_tables(trained, features)
    write_tables(tmp_path / "t", trained, features.numpy())
    mapped = read_tables(tmp_path / "t")
    assert mapped is not None
    assert isinstance(mapped.reduced.parts[0], np.memmap)
    assert mapped.images is not None and isinstance(mapped.images, np.memmap)
    np.testing.assert_array_equal(mapped.reduced.take(np.arange(N_ITEMS + 1)),
                                  in_memory.reduced.take(np.arange(N_ITEMS + 1)))  # fmt: skip
    np.testing.assert_array_equal(mapped.vectors, in_memory.vectors)
    assert not mapped.reduced.take(np.array([0])).any()  # the padding row
    assert read_tables(tmp_path / "nothing") is None
    users, profiles = np.array([2]), np.array([[4, 8, 15, 16]])
    from_disk = ServingModel(copy_of(trained), mapped, device=CPU)
    from_memory = ServingModel(copy_of(trained), in_memory, device=CPU)
    np.testing.assert_array_equal(
        from_disk.queries(users, profiles), from_memory.queries(users, profiles)
    )


def test_rows_stack_parts_without_copying_them() -> None:
    base, added = np.arange(10).reshape(5, 2), np.array([[100, 101], [102, 103]])
    rows = Rows(base).append(added)
    assert len(rows) == 7
    np.testing.assert_array_equal(rows.take(np.array([6, 0, 5, 4, 6])),
                                  [[102, 103], [0, 1], [100, 101], [8, 9], [102, 103]])  # fmt: skip
    assert rows.parts[0] is base


def copy_of(model: ACF, visual: Visual | None = None) -> ACF:
    config = model.config if visual is None else replace(model.config, visual=visual)
    twin = ACF(config, model.features[1:].clone())
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def _served_sasrec(tmp_path: Path) -> tuple[SASRec, Recommender]:
    """A SASRec through a checkpoint file into the engine, as `visrec publish` serves it."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(N_ITEMS, max_len=5, dim=8, heads=2)).eval()
    ckpt = Checkpoint(
        config=model.config,
        state=model.state_dict(),
        user_ids=[10, 11],
        item_ids=list(range(101, 101 + N_ITEMS)),
        features={"inputs_hash": "h"},
        item_popularity=list(range(N_ITEMS)),
        train_config={"profile_size": 5},
        model="sasrec",
    )
    save_checkpoint(tmp_path / "sasrec.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "sasrec.pt")
    assert loaded.model == "sasrec" and loaded.config == model.config
    no_images = np.zeros((N_ITEMS, 1, 1), np.float16)  # it reads none; they fix the items
    engine = build_engine(loaded, no_images, inputs_hash="h", item_ids=loaded.item_ids, device=CPU)
    return model, engine


def test_a_served_sasrec_ranks_and_explains_as_the_model(tmp_path: Path) -> None:
    model, engine = _served_sasrec(tmp_path)
    history = [101, 105, 109]
    with torch.no_grad():
        full = model.score_all(torch.empty(0), torch.tensor([[1, 5, 9]]))[0].numpy()
    [answer] = engine.recommend([Query("10", history, set(), k=N_ITEMS)])
    assert not answer.fallback and sorted(answer.items) == list(range(101, 101 + N_ITEMS))
    np.testing.assert_allclose(answer.scores, full[np.array(answer.items) - 101], atol=1e-5)
    np.testing.assert_allclose(answer.scores, np.sort(full)[::-1], atol=1e-5)

    why = engine.explain("10", history, 120)
    assert why.component_attention is None  # no images: no heatmaps
    assert why.profile.tolist() == [1, 5, 9]
    assert why.item_attention.shape == (3,) and why.item_attention.sum() == pytest.approx(1.0)
    assert why.score == pytest.approx(float(full[19]), abs=1e-5)


def test_sasrecs_attention_ignores_padding_and_depends_on_order() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(N_ITEMS, max_len=5, dim=8, heads=2)).eval()
    with torch.no_grad():
        padded = model.newest_attention(torch.tensor([[0, 0, 1, 5, 9]]))[0]
        bare = model.newest_attention(torch.tensor([[1, 5, 9]]))[0]
        reordered = model.newest_attention(torch.tensor([[9, 5, 1]]))[0]
    assert padded[:2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(padded[2:].numpy(), bare.numpy(), atol=1e-6)
    assert not np.allclose(bare.numpy(), reordered.flip(0).numpy(), atol=1e-4)


def test_a_served_sasrec_falls_back_to_popular_items_without_a_history(tmp_path: Path) -> None:
    _, engine = _served_sasrec(tmp_path)
    known_user_no_items, anonymous = engine.recommend(
        [Query("10", [], set(), k=3), Query(None, [], set(), k=3)]
    )
    # SASRec reads no user embedding: a known user with no items is as unknown as anyone
    assert known_user_no_items.fallback and anonymous.fallback
    assert known_user_no_items.items == [101 + N_ITEMS - 1, 101 + N_ITEMS - 2, 101 + N_ITEMS - 3]
    assert not engine.takes_new_items
    assert engine.refuses_new_item(["Drama"]) == (
        "the serving model cannot score items it was not trained on"
    )
    with pytest.raises(ValueError, match="cannot score items it was not trained on"):
        engine.with_items([999], np.zeros((1, 1, 1), np.float16))


def test_a_new_item_starts_from_its_nearest_looking_items_and_is_not_shorter() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(N_ITEMS, K, C, generator=g)
    model = ACF(SCORED, features).eval()
    with torch.no_grad():
        model.bias.weight[1:] = torch.randn(N_ITEMS, 1, generator=g)  # type: ignore[union-attr]
    serving = ServingModel.from_model(copy_of(model), device=CPU, dtype=np.float32)
    # A new item that looks exactly like item 7: its nearest trained items by image vector
    grown = serving.with_items(features[6:7].numpy())
    images = torch.as_tensor(np.asarray(serving.tables.images, dtype=np.float32))
    near = (torch.nn.functional.normalize(images, dim=1) @ images[6]).topk(NEIGHBOURS).indices + 1
    assert near[0] == 7
    rows = model.item_embedding.weight[near].detach()  # (k, D)
    new = grown.model.item_embedding.weight[N_ITEMS + 1].detach()
    length = rows.norm(dim=1).mean() * NEW_ITEM_LENGTH  # not the mean's, which is shorter
    torch.testing.assert_close(new.norm(), length)
    assert torch.nn.functional.cosine_similarity(new, rows.mean(0), dim=0) > 0.9999
    bias = grown.model.bias.weight[N_ITEMS + 1]  # type: ignore[union-attr]
    torch.testing.assert_close(bias, model.bias.weight[near].mean(0))  # type: ignore[union-attr]


def _nearest_rows(vectors: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(k, ) item indices 1..N of the ``NEIGHBOURS`` rows of ``vectors`` (items 1..N) closest
    (cosine) to ``query``."""
    unit = torch.nn.functional.normalize(vectors, dim=1)
    return (unit @ torch.nn.functional.normalize(query, dim=0)).topk(NEIGHBOURS).indices + 1


def test_a_new_item_is_placed_by_the_tags_it_has_and_scored_by_its_image_too() -> None:
    g = torch.Generator().manual_seed(2)
    features = torch.randn(N_ITEMS, K, C, generator=g)
    model = ACF(TAGGED, features, _tags(TAGGED, g)).eval()
    serving = ServingModel.from_model(copy_of(model), device=CPU, dtype=np.float32)
    image = features[6:7].numpy()
    comedy, horror = (serving.with_items(image, [tags]) for tags in ({"comedy"}, {"horror"}))
    both = serving.with_items(image, [{"comedy", "horror", "not a genre the model knows"}])
    none = serving.with_items(image)
    new = N_ITEMS + 1  # the added item's index; its row in item_vectors is N_ITEMS
    assert comedy.model.item_tags[new].tolist() == [1.0, 0.0, 0.0]
    assert both.model.item_tags[new].tolist() == [0.5, 0.0, 0.5]
    assert none.model.item_tags[new].tolist() == [0.0, 0.0, 0.0]
    # With tags it knows, its rows start from the trained items whose mapped tags are nearest
    with torch.no_grad():
        mapped = model.tag_embedding(model.item_tags[1:])  # type: ignore[misc]
        for grown, column in ((comedy, 0), (horror, 2)):
            near = _nearest_rows(mapped, model.tag_embedding.weight[:, column])  # type: ignore[union-attr]
            rows = model.item_embedding.weight[near]
            start = grown.model.item_embedding.weight[new]
            assert torch.nn.functional.cosine_similarity(start, rows.mean(0), dim=0) > 0.9999
            torch.testing.assert_close(
                start.norm(), rows.norm(dim=1).mean() * NEW_ITEM_LENGTH_BY_TAGS
            )
        # Without any, from the nearest-looking trained items, as a model without metadata
        images = torch.as_tensor(np.asarray(serving.tables.images, dtype=np.float32))
        near = _nearest_rows(images, images[6])
        start = none.model.item_embedding.weight[new]
        assert (
            torch.nn.functional.cosine_similarity(
                start, model.item_embedding.weight[near].mean(0), dim=0
            )
            > 0.9999
        )
    # The image is read too: the same tags with another image give another vector
    other = serving.with_items(features[8:9].numpy(), [{"comedy"}])
    assert not np.allclose(other.item_vectors[N_ITEMS], comedy.item_vectors[N_ITEMS], atol=1e-4)
    # A profile holding the new item reads its genres too: its query moves with them
    profile = np.array([[3, 5, new]])
    queries = [m.queries(np.array([0]), profile) for m in (comedy, horror)]
    assert not np.allclose(*queries)
    # Its explanation says how much of the attention went to profile items sharing its tags
    why = comedy.explain(0, [3, 5, 7], new)
    has = comedy.model.item_tags[[3, 5, 7], 0].numpy() > 0  # which of them are comedies
    assert list(why.tags) == ["comedy"]
    assert why.tags["comedy"] == pytest.approx(float(why.item_attention @ has))
    assert none.explain(0, [3, 5, 7], new).tags == {}  # it has no tag the model knows
    # Added one by one (as POST /items adds them) or together, items are placed alike: the
    # neighbours are trained items only
    together = serving.with_items(features[6:8].numpy(), [{"comedy"}, {"comedy"}])
    one_by_one = comedy.with_items(features[7:8].numpy(), [{"comedy"}])
    np.testing.assert_allclose(one_by_one.item_vectors, together.item_vectors, atol=1e-5)


def test_a_model_without_images_places_a_new_item_by_its_genres() -> None:
    g = torch.Generator().manual_seed(3)
    features = torch.randn(N_ITEMS, K, C, generator=g)
    tags = _tags(TAGGED, g)
    assert tags is not None
    model = ACF(replace(TAGGED, visual="none"), features, tags).eval()
    serving = ServingModel.from_model(copy_of(model), device=CPU, dtype=np.float32)
    assert serving.takes_new_items and not serving.reads_images
    names = [n for n, w in zip(TAGGED.tags, tags[6].tolist(), strict=True) if w > 0]
    grown = serving.with_items(features[:1].numpy(), [names])  # the image is not read
    # Its rows start from the trained items with the same genres (item 7 among them)
    mapped = model.tag_embedding(model.item_tags[1:])  # type: ignore[union-attr]
    similar = torch.nn.functional.normalize(mapped, dim=1) @ torch.nn.functional.normalize(
        mapped[6], dim=0
    )
    near = similar.topk(NEIGHBOURS).indices + 1
    assert 7 in near.tolist()
    rows = model.item_embedding.weight[near].detach()
    new = grown.model.item_embedding.weight[N_ITEMS + 1].detach()
    assert torch.nn.functional.cosine_similarity(new, rows.mean(0), dim=0) > 0.9999
    with pytest.raises(ValueError, match="by its metadata alone"):
        serving.with_items(features[:1].numpy(), [["not a genre it knows"]])
    # POST /items asks the engine first, so such an item is refused before it is stored
    ckpt = Checkpoint(
        config=model.config,
        state=model.state_dict(),
        user_ids=list(range(10, 10 + BASE.n_users)),
        item_ids=list(range(101, 101 + N_ITEMS)),
        features={"inputs_hash": "h"},
        item_popularity=list(range(N_ITEMS)),
    )
    engine = build_engine(
        ckpt, features.numpy(), inputs_hash="h", item_ids=ckpt.item_ids, device=CPU
    )
    assert engine.refuses_new_item(names) is None
    assert "send a genre it knows" in str(engine.refuses_new_item(["noir"]))
    with pytest.raises(ValueError, match="cannot score new items"):
        ServingModel.from_model(ACF(replace(BASE, visual="none"), features), device=CPU).with_items(
            features[:1].numpy()
        )
