"""FAISS top-k against brute force: exact by default, exclusions honoured, k kept when possible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.index.item_index import IndexKind, ItemIndex


def _brute_force(vectors: np.ndarray, query: np.ndarray, exclude: set[int]) -> list[int]:
    scores = vectors @ query
    order = sorted(range(1, len(vectors) + 1), key=lambda i: -scores[i - 1])
    return [i for i in order if i not in exclude]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)


def test_flat_index_returns_the_exact_ranking(vectors: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    excludes = [
        set(rng.choice(np.arange(1, 501), size=40, replace=False).tolist()) for _ in range(7)
    ]
    hits = ItemIndex(vectors).search(queries, 20, exclude=excludes, offset=5)
    for b in range(7):
        expected = _brute_force(vectors, queries[b], excludes[b])[5:25]
        assert hits.items[b].tolist() == expected
        assert not set(hits.items[b].tolist()) & excludes[b]
        np.testing.assert_allclose(
            hits.scores[b], vectors[hits.items[b] - 1] @ queries[b], rtol=1e-5
        )


def test_batch_equals_single(vectors: np.ndarray) -> None:
    index = ItemIndex(vectors)
    queries = np.random.default_rng(2).normal(size=(5, 16)).astype(np.float32)
    batched = index.search(queries, 10)
    for b in range(5):
        single = index.search(queries[b : b + 1], 10)
        assert single.items[0].tolist() == batched.items[b].tolist()


def test_answer_keeps_k_items_until_the_catalogue_runs_out(vectors: np.ndarray) -> None:
    index = ItemIndex(vectors[:30])
    query = vectors[:1]
    excluded = set(range(1, 26))  # 25 of 30 items excluded
    hits = index.search(query, 10, exclude=[excluded])
    assert sorted(hits.items[0][:5].tolist()) == [26, 27, 28, 29, 30]
    assert hits.items[0][5:].tolist() == [0] * 5  # only 5 were left
    assert np.all(np.isneginf(hits.scores[0][5:]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_mostly_agree_with_exact(vectors: np.ndarray, kind: str) -> None:
    queries = np.random.default_rng(3).normal(size=(50, 16)).astype(np.float32)
    exact = ItemIndex(vectors).search(queries, 10)
    approx = ItemIndex(vectors, kind=kind).search(queries, 10)  # type: ignore[arg-type]
    recall = np.mean(
        [
            len(set(a) & set(e)) / 10
            for a, e in zip(approx.items.tolist(), exact.items.tolist(), strict=True)
        ]
    )
    assert recall > 0.8
    assert np.all(approx.items > 0)


def test_bad_arguments_are_refused(vectors: np.ndarray) -> None:
    index = ItemIndex(vectors)
    with pytest.raises(ValueError, match="queries must be"):
        index.search(np.zeros((1, 3), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(vectors[:1], 0)
    with pytest.raises(ValueError, match="unknown index kind"):
        ItemIndex(vectors, kind="lsh")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_approximate_index_is_kept_and_found_again(
    vectors: np.ndarray, kind: IndexKind, tmp_path: Path
) -> None:
    queries = vectors[:5] + 0.1
    built = ItemIndex(vectors, kind=kind, cache=tmp_path)
    (kept,) = tmp_path.glob(f"index-{kind}-*.faiss")
    written = kept.stat().st_mtime_ns
    found = ItemIndex(vectors, kind=kind, cache=tmp_path)
    assert kept.stat().st_mtime_ns == written  # read, not built and written again
    np.testing.assert_array_equal(found.search(queries, 10).items, built.search(queries, 10).items)
    if kind == "hnsw":  # tuned as a built one is
        assert found._index.hnsw.efSearch == built._index.hnsw.efSearch > 16
    else:
        assert found._index.nprobe == built._index.nprobe > 1
    other = vectors[: len(vectors) // 2]  # a stale file for other vectors is not used
    assert ItemIndex(other, kind=kind, cache=tmp_path).n_items == len(other)
    assert ItemIndex(other, kind=kind, cache=tmp_path).search(other[:1], 1).items[0, 0] >= 1
