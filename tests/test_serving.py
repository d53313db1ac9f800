"""The serving path (precomputed tables + FAISS) ranks exactly as the trained model does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.index.item_index import ItemIndex
from service.model.acf import ACF, UNKNOWN_USER, ACFConfig
from service.model.checkpoint import Checkpoint
from service.model.serving import ServingModel
from service.recommender import Query, Recommender

N_ITEMS, K, C = 40, 49, 12


@pytest.fixture
def trained() -> ACF:
    config = ACFConfig(
        n_users=5, n_items=N_ITEMS, feature_dim=C, dim=8, attention_dim=8, item_bias=True
    )
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ACF(config, torch.randn(N_ITEMS, K, C, generator=g)).eval()
    with torch.no_grad():
        model.bias.weight[1:] = torch.randn(N_ITEMS, 1, generator=g)  # type: ignore[union-attr]
    return model


def test_index_over_served_vectors_is_the_models_full_ranking(trained: ACF) -> None:
    users = torch.tensor([0, 3, 4])
    profiles = torch.tensor([[1, 2, 3, 0], [5, 6, 7, 8], [9, 0, 0, 0]])
    with torch.no_grad():
        full = trained.score_all(users, profiles).numpy()
    serving = ServingModel(trained, device=torch.device("cpu"))
    hits = ItemIndex(serving.item_vectors).search(
        serving.queries(users.numpy(), profiles.numpy()), N_ITEMS
    )
    for b in range(3):
        assert hits.items[b].tolist() == (np.argsort(-full[b], kind="stable") + 1).tolist()
        np.testing.assert_allclose(hits.scores[b], np.sort(full[b])[::-1], rtol=1e-5, atol=1e-5)
    assert trained.features.numel() == 0  # raw features were dropped after precomputing


def test_explanation_matches_the_ranking_attention(trained: ACF) -> None:
    model = ServingModel(trained, device=torch.device("cpu"))
    profile = [4, 8, 15, 16]
    why = model.explain(2, profile, item=23)
    attended = model.attend(np.array([2]), np.array([profile]))
    np.testing.assert_allclose(why.item_attention, attended.item_attention[0].numpy())
    assert why.item_attention.sum() == pytest.approx(1.0)
    assert why.component_attention.shape == (4, 7, 7)
    np.testing.assert_allclose(why.component_attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    expected = model.queries(np.array([2]), np.array([profile]))[0] @ model.item_vectors[22]
    assert why.score == pytest.approx(float(expected), rel=1e-5)


def test_an_anonymous_history_is_served(trained: ACF) -> None:
    model = ServingModel(trained, device=torch.device("cpu"))
    q = model.queries(np.array([UNKNOWN_USER]), np.array([[3, 7, 0]]))
    assert q.shape == (1, model.item_vectors.shape[1])
    assert np.all(np.isfinite(q))


def test_a_batch_of_requests_equals_one_at_a_time(trained: ACF) -> None:
    ckpt = Checkpoint(
        config=trained.config,
        state=trained.state_dict(),
        user_ids=[10, 11, 12, 13, 14],
        item_ids=list(range(101, 101 + N_ITEMS)),
        features={"inputs_hash": "h"},
        item_popularity=list(range(N_ITEMS)),
    )
    engine = Recommender.from_checkpoint(ckpt, ServingModel(trained, device=torch.device("cpu")))
    queries = [
        Query("10", [101, 105, 109], {101, 105, 109, 120}, k=5),
        Query("12", [130], set(), k=3, offset=4),
        Query(None, [102, 103], {102, 103}, k=8, offset=1),
        Query("never-seen", [], set(), k=4, offset=2),  # nothing known: popular items
    ]
    batched = engine.recommend(queries)
    for query, answer in zip(queries, batched, strict=True):
        assert engine.recommend([query])[0] == answer
        assert len(answer.items) == query.k
        assert not set(answer.items) & set(query.exclude)
    assert [b.fallback for b in batched] == [False, False, False, True]
    assert batched[3].items == [101 + i for i in (37, 36, 35, 34)]  # most popular, from offset 2
