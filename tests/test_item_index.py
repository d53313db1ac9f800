"""FAISS top-k against brute force: exact by default, exclusions honoured, k kept when possible."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.index import item_index
from service.index.item_index import Allowed, IndexKind, ItemIndex


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


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("exact_below", [0, item_index.EXACT_BELOW], ids=["selector", "exact"])
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 400),
    seed=st.integers(0, 2**16),
    share=st.sampled_from([0.0, 0.001, 0.02, 0.3, 1.0]),
    k=st.integers(1, 30),
    offset=st.integers(0, 5),
)
def test_a_filtered_search_returns_min_k_passing_items_and_only_those(
    kind: IndexKind, exact_below: int, n: int, seed: int, share: float, k: int, offset: int
) -> None:
    """Filters are applied inside the search (a FAISS selector, or an exact ranking of the
    passing items), never by over-fetching: whatever the filter, the index or the catalogue,
    an answer has exactly min(k, passing) items, all passing, the best of them where the search
    is exact."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    allowed = [rng.random(n + 1) < share for _ in range(3)]
    allowed[1] = None  # an unfiltered query in the same batch
    excluded = [set(rng.choice(np.arange(1, n + 1), size=n // 4, replace=False).tolist())] * 3
    passes = [None if a is None else Allowed.of(a) for a in allowed]
    with patch.object(item_index, "EXACT_BELOW", exact_below):
        hits = ItemIndex(vectors, kind=kind).search(
            queries, k, exclude=excluded, offset=offset, allowed=passes
        )
    for b in range(3):
        mask = np.ones(n + 1, bool) if allowed[b] is None else allowed[b].copy()
        mask[0] = False
        mask[list(excluded[b])] = False
        passing = np.flatnonzero(mask)
        assert hits.passing[b] == len(passing)
        got = hits.items[b][hits.items[b] > 0]
        assert len(got) == max(0, min(k, len(passing) - offset))
        assert set(got.tolist()) <= set(passing.tolist())
        if kind == "flat" or (allowed[b] is not None and len(passing) < exact_below):
            best = np.sort(vectors[passing - 1] @ queries[b])[::-1][offset : offset + k]
            np.testing.assert_allclose(hits.scores[b][: len(got)], best, rtol=1e-4, atol=1e-5)
