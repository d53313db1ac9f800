"""Tests for service.offline.evaluation.metrics: hand-computed cases, a slow reference,
bootstrap checks."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest

from service.offline.evaluation.metrics import (
    KS,
    Exclusions,
    Interval,
    bootstrap,
    metric_table,
    paired_bootstrap,
    rank_targets,
    summarise,
)


def _rank_one(scores: list[float], target: int, excluded: list[int]) -> tuple[int, int]:
    ranks, n_candidates = rank_targets(
        np.array([scores], dtype=np.float64),
        np.array([target]),
        Exclusions.from_lists([excluded]),
    )
    return int(ranks[0]), int(n_candidates[0])


# ---------------------------------------------------------------- rank_targets, by hand


@pytest.mark.parametrize(
    ("scores", "target", "excluded", "rank", "n_candidates"),
    [
        # Target col 2 scores .5; cols 0 (.9) and 3 (.7) beat it -> r = 2, C = 5.
        ([0.9, 0.1, 0.5, 0.7, 0.3], 2, [], 2, 5),
        # Same, col 0 excluded: only col 3 (.7) beats it -> r = 1, C = 4.
        ([0.9, 0.1, 0.5, 0.7, 0.3], 2, [0], 1, 4),
        # Excluding items scored below the target changes C but not r: r = 2, C = 3.
        ([0.9, 0.1, 0.5, 0.7, 0.3], 2, [1, 4], 2, 3),
        # Ties are pessimistic: target col 0 (.5) ties cols 1 and 3 and loses to col 4 (.9)
        # -> r = 3, C = 5.
        ([0.5, 0.5, 0.2, 0.5, 0.9], 0, [], 3, 5),
        # Same with col 4 excluded: the two ties still rank above -> r = 2, C = 4.
        ([0.5, 0.5, 0.2, 0.5, 0.9], 0, [4], 2, 4),
        # Excluding a tied item removes it: cols 3 and 4 remain above -> r = 2, C = 4.
        ([0.5, 0.5, 0.2, 0.5, 0.9], 0, [1], 2, 4),
        # All scores equal: every other candidate ranks above -> r = 3, C = 4.
        ([0.4, 0.4, 0.4, 0.4], 2, [], 3, 4),
        # Strictly the best -> r = 0, C = 3.
        ([0.1, 0.8, 0.3], 1, [], 0, 3),
        # Infinities compare normally: target col 1 scores 1.0; col 0 (+inf) beats it and
        # col 2 (-inf) does not -> r = 1, C = 3.
        ([math.inf, 1.0, -math.inf], 1, [], 1, 3),
    ],
)
def test_rank_targets_hand_cases(
    scores: list[float], target: int, excluded: list[int], rank: int, n_candidates: int
) -> None:
    assert _rank_one(scores, target, excluded) == (rank, n_candidates)


def test_rank_targets_several_users_at_once_match_one_at_a_time() -> None:
    rows = [
        ([0.9, 0.1, 0.5, 0.7, 0.3], 2, [0]),
        ([0.5, 0.5, 0.2, 0.5, 0.9], 0, [4]),
        ([0.2, 0.3, 0.4, 0.5, 0.6], 4, [0, 1, 2]),
    ]
    scores = np.array([row[0] for row in rows])
    targets = np.array([row[1] for row in rows])
    ranks, n_candidates = rank_targets(
        scores, targets, Exclusions.from_lists([row[2] for row in rows])
    )
    assert ranks.dtype == np.int64
    assert n_candidates.dtype == np.int64
    # By hand: (r=1, C=4), (r=2, C=4), (r=0, C=2).
    np.testing.assert_array_equal(ranks, [1, 2, 0])
    np.testing.assert_array_equal(n_candidates, [4, 4, 2])
    for u, (row_scores, target, excluded) in enumerate(rows):
        assert _rank_one(row_scores, target, excluded) == (ranks[u], n_candidates[u])


# ---------------------------------------------------------------- rank_targets vs slow reference


def _reference_ranks(
    scores: np.ndarray, targets: np.ndarray, excluded: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Sorts each user's explicit candidate list by score, target last among equals."""
    ranks, n_candidates = [], []
    for u in range(scores.shape[0]):
        target = int(targets[u])
        candidates = [c for c in range(scores.shape[1]) if c not in excluded[u]]
        ordered = sorted(candidates, key=lambda c: (-scores[u, c], c == target))
        ranks.append(ordered.index(target))
        n_candidates.append(len(candidates))
    return np.array(ranks), np.array(n_candidates)


def _random_case(
    rng: np.random.Generator, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    # Few distinct integer values, so ties are everywhere; a few infinities for good measure.
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float64)
    scores[rng.random(scores.shape) < 0.02] = np.inf
    scores[rng.random(scores.shape) < 0.02] = -np.inf
    targets = rng.integers(0, n_items, size=n_users)
    excluded = []
    for target in targets:
        others = np.delete(np.arange(n_items), target)
        size = int(rng.integers(0, n_items // 2))
        excluded.append(rng.choice(others, size=size, replace=False).tolist())
    return scores, targets, excluded


@pytest.mark.parametrize("seed", range(6))
def test_rank_targets_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores, targets, excluded = _random_case(rng, n_users=40, n_items=30)
    ranks, n_candidates = rank_targets(scores, targets, Exclusions.from_lists(excluded))
    expected_ranks, expected_candidates = _reference_ranks(scores, targets, excluded)
    np.testing.assert_array_equal(ranks, expected_ranks)
    np.testing.assert_array_equal(n_candidates, expected_candidates)


@pytest.mark.parametrize("max_block", [1, 30, 31, 95, 10_000])
def test_rank_targets_chunking_does_not_change_results(max_block: int) -> None:
    rng = np.random.default_rng(7)
    scores, targets, excluded = _random_case(rng, n_users=25, n_items=30)
    exclusions = Exclusions.from_lists(excluded)
    whole = rank_targets(scores, targets, exclusions)
    chunked = rank_targets(scores, targets, exclusions, max_block=max_block)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_rank_targets_float32_ties_are_pessimistic() -> None:
    scores = np.array([[0.1, 0.7, 0.7, 0.7]], dtype=np.float32)
    ranks, _ = rank_targets(scores, np.array([1]), Exclusions.from_lists([[]]))
    # Cols 2 and 3 tie the target (.7) and count above it -> r = 2.
    assert ranks.tolist() == [2]


# ---------------------------------------------------------------- metric_table, by hand


def test_metric_table_seed_protocol_by_hand() -> None:
    # N=5, scores [.9,.1,.5,.7,.3], target col 2, excluded [0] -> r = 1, C = 4.
    ranks, n_candidates = rank_targets(
        np.array([[0.9, 0.1, 0.5, 0.7, 0.3]]), np.array([2]), Exclusions.from_lists([[0]])
    )
    table = metric_table(ranks, n_candidates, catalogue_size=5, protocol="seed", ks=(1, 2))
    # AUC = 1 - r/(N-1) = 1 - 1/4 = 0.75;  RR = 1/(1+1) = 0.5.
    # k=1: r >= 1 -> R = P = nDCG = 0.
    # k=2: R = 1, P = 1/2, nDCG = 1/log2(1+2) = 0.6309297535714575.
    expected = {
        "AUC": 0.75,
        "RR": 0.5,
        "R@1": 0.0,
        "P@1": 0.0,
        "nDCG@1": 0.0,
        "R@2": 1.0,
        "P@2": 0.5,
        "nDCG@2": 0.6309297535714575,
    }
    assert list(table) == list(expected)
    for name, value in expected.items():
        assert table[name].tolist() == pytest.approx([value]), name


def test_metric_table_standard_protocol_by_hand() -> None:
    # N=5, scores [.5,.5,.2,.5,.9], target col 0, excluded [4] -> ties with cols 1 and 3
    # count above -> r = 2, C = 4.
    ranks, n_candidates = rank_targets(
        np.array([[0.5, 0.5, 0.2, 0.5, 0.9]]), np.array([0]), Exclusions.from_lists([[4]])
    )
    table = metric_table(ranks, n_candidates, catalogue_size=5, protocol="standard", ks=(2, 3))
    # AUC = 1 - r/(C-1) = 1 - 2/3 = 1/3;  RR = 1/3.
    # k=2: r >= 2 -> 0.  k=3: R = 1, P = 1/3, nDCG = 1/log2(2+2) = 0.5.
    expected = {
        "AUC": 1 / 3,
        "RR": 1 / 3,
        "R@2": 0.0,
        "P@2": 0.0,
        "nDCG@2": 0.0,
        "R@3": 1.0,
        "P@3": 1 / 3,
        "nDCG@3": 0.5,
    }
    assert list(table) == list(expected)
    for name, value in expected.items():
        assert table[name].tolist() == pytest.approx([value]), name


def test_protocols_differ_only_in_auc() -> None:
    # All equal scores [.4]*4, target col 2, excluded [0] -> r = 2 (cols 1 and 3 tie above), C=3.
    # seed: AUC = 1 - 2/(4-1) = 1/3.  standard: AUC = 1 - 2/(3-1) = 0.
    ranks, n_candidates = rank_targets(
        np.full((1, 4), 0.4), np.array([2]), Exclusions.from_lists([[0]])
    )
    seed = metric_table(ranks, n_candidates, catalogue_size=4, protocol="seed", ks=(1, 3))
    standard = metric_table(ranks, n_candidates, catalogue_size=4, protocol="standard", ks=(1, 3))
    assert seed["AUC"].tolist() == pytest.approx([1 / 3])
    assert standard["AUC"].tolist() == pytest.approx([0.0])
    # RR = 1/3; R@3 = 1, P@3 = 1/3, nDCG@3 = 1/log2(4) = 0.5, under both.
    for table in (seed, standard):
        assert table["RR"].tolist() == pytest.approx([1 / 3])
        assert table["R@3"].tolist() == [1.0]
        assert table["P@3"].tolist() == pytest.approx([1 / 3])
        assert table["nDCG@3"].tolist() == pytest.approx([0.5])
    assert [name for name in seed if name != "AUC"] == [n for n in standard if n != "AUC"]


def test_metric_table_best_rank_is_perfect() -> None:
    # r = 0 -> AUC = 1, RR = 1, R@1 = P@1 = 1, nDCG@1 = 1/log2(2) = 1.
    table = metric_table(
        np.array([0]), np.array([3]), catalogue_size=3, protocol="standard", ks=(1,)
    )
    assert {name: value.tolist() for name, value in table.items()} == {
        "AUC": [1.0],
        "RR": [1.0],
        "R@1": [1.0],
        "P@1": [1.0],
        "nDCG@1": [1.0],
    }


def test_metric_table_default_keys_in_order() -> None:
    table = metric_table(
        np.array([0, 150]), np.array([300, 300]), catalogue_size=300, protocol="seed"
    )
    assert KS == (20, 100, 200)
    assert list(table) == [
        "AUC", "RR",
        "R@20", "P@20", "nDCG@20",
        "R@100", "P@100", "nDCG@100",
        "R@200", "P@200", "nDCG@200",
    ]  # fmt: skip
    # User 2 has r = 150: a hit at 200 only, P@200 = 1/200.
    assert table["R@100"].tolist() == [1.0, 0.0]
    assert table["P@200"].tolist() == [1 / 200, 1 / 200]


@pytest.mark.parametrize("protocol", ["seed", "standard"])
def test_metric_table_matches_definitions_per_user(protocol: Literal["seed", "standard"]) -> None:
    rng = np.random.default_rng(3)
    catalogue_size = 50
    n_candidates = rng.integers(2, catalogue_size + 1, size=200)
    ranks = rng.integers(0, n_candidates)
    ks = (1, 5, 20)
    table = metric_table(
        ranks, n_candidates, catalogue_size=catalogue_size, protocol=protocol, ks=ks
    )
    for u, (r, c) in enumerate(zip(ranks.tolist(), n_candidates.tolist(), strict=True)):
        denominator = catalogue_size - 1 if protocol == "seed" else c - 1
        assert table["AUC"][u] == pytest.approx(1 - r / denominator)
        assert table["RR"][u] == pytest.approx(1 / (r + 1))
        for k in ks:
            hit = 1.0 if r < k else 0.0
            assert table[f"R@{k}"][u] == hit
            assert table[f"P@{k}"][u] == pytest.approx(hit / k)
            assert table[f"nDCG@{k}"][u] == pytest.approx(hit / math.log2(r + 2))


# ---------------------------------------------------------------- errors


def test_target_inside_exclusions_raises() -> None:
    with pytest.raises(ValueError, match="target"):
        _rank_one([0.9, 0.1, 0.5], 2, [0, 2])


@pytest.mark.parametrize("nan_at", [(0, 1), (0, 2), (3, 0)])
def test_nan_scores_raise(nan_at: tuple[int, int]) -> None:
    # NaN in a non-target column, in the target column, and in a later row chunk.
    scores = np.ones((4, 3))
    scores[nan_at] = np.nan
    exclusions = Exclusions.from_lists([[], [], [], []])
    with pytest.raises(ValueError, match="NaN"):
        rank_targets(scores, np.array([2, 0, 0, 1]), exclusions, max_block=3)


def test_rank_targets_shape_and_range_errors() -> None:
    scores = np.ones((2, 3))
    two_rows = Exclusions.from_lists([[], []])
    with pytest.raises(ValueError, match="targets"):
        rank_targets(scores, np.array([0, 1, 2]), two_rows)
    with pytest.raises(ValueError, match="targets"):
        rank_targets(scores, np.array([0.0, 1.0]), two_rows)
    with pytest.raises(ValueError, match="rows"):
        rank_targets(scores, np.array([0, 1]), Exclusions.from_lists([[]]))
    with pytest.raises(ValueError, match="2-D"):
        rank_targets(np.ones(3), np.array([0]), Exclusions.from_lists([[]]))
    with pytest.raises(ValueError, match="float"):
        rank_targets(np.ones((2, 3), dtype=np.int64), np.array([0, 1]), two_rows)
    with pytest.raises(ValueError, match="targets"):
        rank_targets(scores, np.array([0, 3]), two_rows)
    with pytest.raises(ValueError, match="excluded"):
        rank_targets(scores, np.array([0, 1]), Exclusions.from_lists([[3], []]))


def test_exclusions_validation() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Exclusions.from_lists([[1], [2, 0, 2]])
    with pytest.raises(ValueError, match="non-negative"):
        Exclusions.from_lists([[-1]])
    with pytest.raises(ValueError, match="indptr"):
        Exclusions(indptr=np.array([0, 2]), indices=np.array([1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        Exclusions(indptr=np.array([0, 2, 1, 2]), indices=np.array([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        Exclusions(indptr=np.array([0, 1]), indices=np.array([1.0]))


def test_exclusions_from_lists_layout() -> None:
    exclusions = Exclusions.from_lists([[4, 1], [], [0]])
    assert exclusions.n_rows == 3
    assert exclusions.indptr.tolist() == [0, 2, 2, 3]
    assert exclusions.indices.tolist() == [4, 1, 0]
    assert exclusions.row_ids().tolist() == [0, 0, 2]
    assert Exclusions.from_lists([]).n_rows == 0


def test_metric_table_errors() -> None:
    with pytest.raises(ValueError, match="ranks"):
        metric_table(np.array([3]), np.array([3]), catalogue_size=5, protocol="seed")
    with pytest.raises(ValueError, match="ranks"):
        metric_table(np.array([-1]), np.array([3]), catalogue_size=5, protocol="seed")
    with pytest.raises(ValueError, match="must be"):
        metric_table(np.array([0, 1]), np.array([3]), catalogue_size=5, protocol="seed")
    with pytest.raises(ValueError, match="2 candidates"):
        metric_table(np.array([0]), np.array([1]), catalogue_size=5, protocol="standard")
    with pytest.raises(ValueError, match="exceed"):
        metric_table(np.array([0]), np.array([6]), catalogue_size=5, protocol="seed")
    with pytest.raises(ValueError, match="protocol"):
        metric_table(np.array([0]), np.array([3]), catalogue_size=5, protocol="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cut-offs"):
        metric_table(np.array([0]), np.array([3]), catalogue_size=5, protocol="seed", ks=(0,))


# ---------------------------------------------------------------- bootstrap


def _width(interval: Interval) -> float:
    return interval.high - interval.low


def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(0).exponential(size=943)
    interval = bootstrap(values, rng=np.random.default_rng(1))
    assert interval.mean == pytest.approx(values.mean())
    assert interval.low < interval.mean < interval.high


def test_bootstrap_constant_input_has_zero_width() -> None:
    interval = bootstrap(np.full(100, 0.1), rng=np.random.default_rng(0))
    assert interval.low == interval.high
    assert interval.mean == pytest.approx(0.1)
    assert interval.low == pytest.approx(0.1)


def test_bootstrap_same_seed_same_interval() -> None:
    values = np.random.default_rng(0).random(300)
    first = bootstrap(values, rng=np.random.default_rng(42), n_resamples=200)
    second = bootstrap(values, rng=np.random.default_rng(42), n_resamples=200)
    other = bootstrap(values, rng=np.random.default_rng(43), n_resamples=200)
    assert first == second
    assert first != other


def test_bootstrap_bernoulli_width_matches_normal_approximation() -> None:
    # The mean of 2000 Bernoulli(0.3) draws has sd sqrt(.3 * .7 / 2000) = 0.010247;
    # a 95% interval is about 2 * 1.96 * 0.010247 = 0.04017 wide.
    values = (np.random.default_rng(5).random(2000) < 0.3).astype(np.float64)
    interval = bootstrap(values, rng=np.random.default_rng(6), n_resamples=2000)
    expected = 2 * 1.96 * math.sqrt(0.3 * 0.7 / 2000)
    assert _width(interval) == pytest.approx(expected, rel=0.2)


def test_bootstrap_level_widens_the_interval() -> None:
    values = np.random.default_rng(0).random(500)
    narrow = bootstrap(values, rng=np.random.default_rng(1), level=0.5)
    wide = bootstrap(values, rng=np.random.default_rng(1), level=0.99)
    assert _width(narrow) < _width(wide)


def test_bootstrap_many_resamples_span_several_chunks() -> None:
    # 6000 users x 1000 resamples exceeds one resample block, so several chunks are drawn.
    values = (np.random.default_rng(0).random(6000) < 0.5).astype(np.float64)
    interval = bootstrap(values, rng=np.random.default_rng(1))
    expected = 2 * 1.96 * math.sqrt(0.25 / 6000)
    assert _width(interval) == pytest.approx(expected, rel=0.2)


def _unpaired_difference_width(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_resamples: int
) -> float:
    """Width of a 95% interval of mean(a) - mean(b) resampling a and b independently."""
    n = a.size
    diffs = [
        a[rng.integers(0, n, n)].mean() - b[rng.integers(0, n, n)].mean()
        for _ in range(n_resamples)
    ]
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(high - low)


def test_paired_bootstrap_is_narrower_for_correlated_systems() -> None:
    rng = np.random.default_rng(0)
    user_effect = rng.normal(size=1000)  # shared by both systems
    a = user_effect + 0.1 * rng.normal(size=1000) + 0.05
    b = user_effect + 0.1 * rng.normal(size=1000)
    paired = paired_bootstrap(a, b, rng=np.random.default_rng(1))
    unpaired = _unpaired_difference_width(a, b, np.random.default_rng(2), 1000)
    assert paired.mean == pytest.approx(a.mean() - b.mean())
    # Paired sd ~ sqrt(.02/1000), unpaired ~ sqrt(2.02/1000): about 10x narrower.
    assert _width(paired) < unpaired / 5
    assert paired.low > 0  # the 0.05 shift is detected


def test_paired_bootstrap_identical_systems_give_zero() -> None:
    a = np.random.default_rng(0).random(500)
    interval = paired_bootstrap(a, a.copy(), rng=np.random.default_rng(1))
    assert interval == Interval(mean=0.0, low=0.0, high=0.0)


def test_paired_bootstrap_constant_shift_has_zero_width() -> None:
    # If the same users were not drawn for both systems this interval would be wide.
    b = np.random.default_rng(0).integers(0, 2, size=500).astype(np.float64)
    interval = paired_bootstrap(b + 1.0, b, rng=np.random.default_rng(1))
    assert interval == Interval(mean=1.0, low=1.0, high=1.0)


def test_summarise_keeps_order_and_means() -> None:
    ranks = np.random.default_rng(0).integers(0, 300, size=400)
    table = metric_table(ranks, np.full(400, 300), catalogue_size=300, protocol="standard")
    summary = summarise(table, rng=np.random.default_rng(1), n_resamples=200)
    again = summarise(table, rng=np.random.default_rng(1), n_resamples=200)
    assert list(summary) == list(table)
    assert summary == again
    for name, interval in summary.items():
        assert interval.mean == pytest.approx(table[name].mean())
        assert interval.low <= interval.high


def test_bootstrap_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap(np.array([0.1, np.nan]), rng=rng)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap(np.array([]), rng=rng)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap(np.ones((2, 2)), rng=rng)
    with pytest.raises(ValueError, match="level"):
        bootstrap(np.ones(3), rng=rng, level=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap(np.ones(3), rng=rng, n_resamples=0)
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(np.ones(3), np.ones(4), rng=rng)
