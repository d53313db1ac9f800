"""The cold-item protocol: items held out entirely, as a new film known only by its poster is,
then ranked for the users who chose them.

A share of the items that have interactions (default 20%, drawn with a generator) is held out,
half for validation (where settings are chosen) and half for test. Models train on the rest,
the *warm* dataset: the warm items renumbered 1..Nw in ``items.csv`` order, every interaction
with a held-out item dropped. A user who chose held-out items has all of them as targets and
their last warm items as profile; held-out items enter a model after training, as the service
adds them (``POST /items``), so they are numbered Nw+1.. in the order given here.

Metrics with several targets a user: recall@k (the share of a user's targets in their top k)
and nDCG@k (binary gains, over the ideal order of those targets). Ties count against the model,
as in :mod:`service.offline.evaluation.metrics`: a target ranks below every other candidate
scoring as much as it does.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from service.model.acf import ACF
from service.model.projection import Projection
from service.model.serving import ServingModel
from service.model.tags import WORD
from service.offline.data.dataset import Dataset, group_by_user, leave_last_out
from service.offline.data.sampling import last_items
from service.offline.evaluation.evaluate import Task, evaluate, holdout_task
from service.offline.evaluation.metrics import HEADLINE, Interval, bootstrap, paired_bootstrap
from service.offline.experiments.plan import Plan, seeded
from service.offline.experiments.results import Table
from service.offline.training.pipeline import Prepared
from service.offline.training.runner import Runner
from service.offline.training.train import TrainResult, as_scored

log = logging.getLogger(__name__)

COLD_SHARE = 0.2
# The three rankings: the held-out items among themselves; the whole catalogue with them added
# (what a user of the service sees); `standard` on the warm items (what the cold gain costs)
RANKINGS = ("cold", "all", "warm")


@dataclass(frozen=True)
class ColdTargets:
    """Users who chose held-out items: their warm profile and the held-out items they chose."""

    users: np.ndarray  # (U,) user indices (the same in the warm and the full dataset)
    profiles: np.ndarray  # (U, L) warm items 1..Nw, oldest first, PAD on the left
    targets: tuple[np.ndarray, ...]  # per user: columns 0..M-1 of the held-out items chosen
    times: np.ndarray  # (U, L) when each profile item came, in seconds


@dataclass(frozen=True)
class ColdSplit:
    warm: Dataset  # without the held-out items, renumbered 1..Nw
    warm_items: np.ndarray  # (Nw,) full-dataset index (1..N) of warm item 1..Nw
    validation_items: np.ndarray  # (Mv,) full-dataset indices of the validation half
    test_items: np.ndarray  # (Mt,) full-dataset indices of the test half
    validation: ColdTargets  # targets: columns of validation_items
    test: ColdTargets  # targets: columns of test_items


def cold_split(
    data: Dataset,
    rng: np.random.Generator,
    *,
    share: float = COLD_SHARE,
    profile_size: int = 9,
) -> ColdSplit:
    """Hold ``share`` of the items with interactions out of ``data`` (see the module doc)."""
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must be in (0, 1), got {share}")
    chosen = np.unique(data.items)
    held = rng.permutation(chosen)[: max(2, round(share * len(chosen)))]
    if len(held) >= len(chosen):
        raise ValueError(f"{data.root}: too few items to hold {share:.0%} of them out")
    validation_items, test_items = np.sort(held[: len(held) // 2]), np.sort(held[len(held) // 2 :])
    cold = np.zeros(data.n_items + 1, dtype=bool)
    cold[held] = True
    warm_items = np.flatnonzero(~cold[1:]) + 1
    renumber = np.zeros(data.n_items + 1, dtype=np.int64)
    renumber[warm_items] = np.arange(1, len(warm_items) + 1)
    order = np.lexsort((np.arange(len(data.users)), data.timestamps))  # time, then file order
    users, items = data.users[order], data.items[order]
    keep = ~cold[data.items]
    warm = replace(
        data,
        item_ids=data.item_ids[warm_items - 1],
        image_paths=tuple(data.image_paths[i - 1] for i in warm_items),
        titles=tuple(data.titles[i - 1] for i in warm_items),
        genres=tuple(data.genres[i - 1] for i in warm_items) if data.genres else (),
        users=data.users[keep],
        items=renumber[data.items[keep]],
        timestamps=data.timestamps[keep],
    )
    warm_in_time = ~cold[items]
    warm_users = users[warm_in_time]
    warm_sequences = group_by_user(warm_users, renumber[items[warm_in_time]], data.n_users)
    times = data.timestamps[order][warm_in_time]
    warm_times = group_by_user(warm_users, times, data.n_users)
    profiles = (warm_sequences, warm_times)
    return ColdSplit(
        warm,
        warm_items,
        validation_items,
        test_items,
        _targets(users, items, validation_items, profiles, profile_size),
        _targets(users, items, test_items, profiles, profile_size),
    )


def _targets(
    users: np.ndarray,
    items: np.ndarray,
    held: np.ndarray,
    warm: tuple[list[np.ndarray], list[np.ndarray]],
    profile_size: int,
) -> ColdTargets:
    """``warm``: per user, their warm items and those items' times, oldest first."""
    column = {int(item): c for c, item in enumerate(held)}
    chosen: dict[int, list[int]] = {}
    for u, item in zip(users.tolist(), items.tolist(), strict=True):
        if item in column:
            chosen.setdefault(u, []).append(column[item])
    who = np.array(sorted(chosen), dtype=np.int64)
    sequences, times = warm
    return ColdTargets(
        who,
        last_items([sequences[u] for u in who], profile_size),
        tuple(np.array(chosen[u], dtype=np.int64) for u in who),
        last_items([times[u] for u in who], profile_size),
    )


def multi_target_metrics(
    scores: np.ndarray, targets: tuple[np.ndarray, ...], *, k: int = 20
) -> dict[str, np.ndarray]:
    """Per user: R@k and nDCG@k of ``targets`` (columns of ``scores``, (U, M))."""
    recall = np.zeros(len(targets))
    ndcg = np.zeros(len(targets))
    discounts = 1 / np.log2(np.arange(k) + 2)
    for u, columns in enumerate(targets):
        row = scores[u]
        # a target's rank: every other candidate scoring at least as much is above it
        ranks = (row[None, :] >= row[columns][:, None]).sum(1) - 1
        hits = ranks[ranks < k]
        recall[u] = len(hits) / len(columns)
        ndcg[u] = discounts[hits].sum() / discounts[: min(k, len(columns))].sum()
    return {f"R@{k}": recall, f"nDCG@{k}": ndcg}


# --------------------------------------------------------------------------- cold-item scorers
# Each gives (U, M) scores of held-out items ``candidates`` (full-dataset indices) for the
# users of ``part``, whose profiles are warm items (see ColdSplit.warm_items).


def profile_items(split: ColdSplit, part: ColdTargets) -> list[np.ndarray]:
    """Per user of ``part``: their profile as full-dataset item indices, oldest first."""
    return [split.warm_items[p[p > 0] - 1] for p in part.profiles]


def random_scores(
    part: ColdTargets, candidates: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    return rng.random((len(part.users), len(candidates)))


def genre_scores(
    split: ColdSplit,
    part: ColdTargets,
    candidates: np.ndarray,
    genres: Sequence[frozenset[str]],
    rng: np.random.Generator,
) -> np.ndarray:
    """Metadata alone: the mean, over a candidate's genres, of the share of the user's profile
    items that have that genre (``genres``: of full-dataset items 1..N). Many films share a
    genre set, so many scores tie: ties are broken at random (the metrics place a target below
    every candidate that ties with it, which put this row below random)."""
    names = sorted(set().union(*genres))
    column = {g: c for c, g in enumerate(names)}
    has = np.zeros((len(genres) + 1, len(names)))
    for item, gs in enumerate(genres, start=1):
        has[item, [column[g] for g in gs]] = 1
    shares = np.stack(
        [has[p].mean(0) if len(p) else np.zeros(len(names)) for p in profile_items(split, part)]
    )  # (U, G)
    chosen = has[candidates]  # (M, G)
    scores = shares @ chosen.T / np.maximum(chosen.sum(1), 1)  # multiples of 1 / (G L)
    return _ties_broken(scores, rng)


def text_scores(
    split: ColdSplit,
    part: ColdTargets,
    candidates: np.ndarray,
    texts: Sequence[str],
    rng: np.random.Generator,
) -> np.ndarray:
    """Metadata alone, as words: TF-IDF vectors of the items' texts (``texts``: of full-dataset
    items 1..N, e.g. title and genres), the cosine of a candidate's with the mean of the
    profile's (each unit length). Ties (no word in common: 0) are broken at random."""
    docs = [set(WORD.findall(t.lower())) for t in texts]
    counts = Counter(w for d in docs for w in d)
    profiles = profile_items(split, part)
    needed = sorted({int(i) for p in profiles for i in p} | set(candidates.tolist()))
    vocabulary = {w: j for j, w in enumerate(sorted({w for i in needed for w in docs[i - 1]}))}
    vectors = np.zeros((len(texts), len(vocabulary)))  # row i - 1: item i (needed ones only)
    for i in needed:
        for w in docs[i - 1]:
            vectors[i - 1, vocabulary[w]] = np.log(len(texts) / counts[w])
    return _ties_broken(_profile_cosine(vectors, profiles, candidates), rng)


def image_scores(
    split: ColdSplit, part: ColdTargets, candidates: np.ndarray, features: np.ndarray
) -> np.ndarray:
    """The image alone: cosine of a candidate's image (its components' mean, from the raw
    (N, K, C) ``features`` of items 1..N) with the mean of the profile's."""
    pooled = np.asarray(features, dtype=np.float32).mean(1)
    return _profile_cosine(pooled, profile_items(split, part), candidates)


def _profile_cosine(
    vectors: np.ndarray, profiles: Sequence[np.ndarray], candidates: np.ndarray
) -> np.ndarray:
    """(U, M) cosine of each candidate's vector (row i - 1 of ``vectors``: item i) with the
    mean of its user's profile items' vectors, each made unit length first (0 for an empty
    profile)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    users = np.stack(
        [unit[p - 1].mean(0) if len(p) else np.zeros(unit.shape[1], unit.dtype) for p in profiles]
    )
    users /= np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    return users @ unit[candidates - 1].T


def _ties_broken(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``scores`` with ties broken at random: the metrics place a target below every
    candidate that ties with it, which coarse metadata scores would pay for."""
    return scores + 1e-9 * rng.random(scores.shape)


def served_scores(
    model: ACF,
    projection: Projection | None,
    part: ColdTargets,
    candidates: np.ndarray,
    features: np.ndarray,
    tags: Sequence[frozenset[str]] = (),
    *,
    device: torch.device,
) -> np.ndarray:
    """ACF trained on the warm data, the held-out items added after training through the
    serving code (``ServingModel.with_items``, what ``POST /items`` runs): (U, Nw + M) scores,
    the warm items first, then ``candidates`` in order, from their raw (N, K, C) features and
    their ``tags`` (of items 1..N, ``Dataset.tags``; read by a model with metadata)."""
    serving = ServingModel.from_model(
        copy.deepcopy(model), device=device, projection=projection, dtype=np.float32
    )
    grown = serving.with_items(
        np.asarray(features[candidates - 1], dtype=np.float32),
        [tags[i - 1] for i in candidates] if tags else None,
    )
    return grown.queries(part.users, part.profiles, part.times) @ grown.item_vectors.T


@dataclass(frozen=True)
class Mixed:
    """The held-out items among the whole catalogue, as a user of the service sees them."""

    metrics: dict[str, np.ndarray]  # per user: R@k and nDCG@k of their held-out items
    shown: np.ndarray  # (U,) share of held-out items in the user's top k
    chosen: np.ndarray  # (U,) share of held-out items among everything the user chose

    @property
    def exposure(self) -> float:
        """Held-out items' share of top-k lists over their share of what users chose: < 0.5
        buries them, > 2 floods the lists with them."""
        return float(self.shown.mean() / self.chosen.mean())


def mixed_ranking(split: ColdSplit, part: ColdTargets, scores: np.ndarray, *, k: int = 20) -> Mixed:
    """``scores`` (U, Nw + M): warm items first, then the held-out ones (as
    :func:`served_scores` gives them). A user's warm items are removed from their ranking, as
    the service removes what a user has seen."""
    warm = split.warm
    n_warm = warm.n_items
    masked = np.array(scores, dtype=np.float64)
    chosen = np.zeros(len(part.users))
    for row, user in enumerate(part.users.tolist()):
        seen = warm.items[warm.users == user]
        masked[row, seen - 1] = -np.inf
        chosen[row] = len(part.targets[row]) / (len(part.targets[row]) + len(seen))
    targets = tuple(t + n_warm for t in part.targets)
    top = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    return Mixed(multi_target_metrics(masked, targets, k=k), (top >= n_warm).mean(1), chosen)


# ------------------------------------------------------------------------- the protocol's run
@dataclass
class ColdRow:
    """One row's per-seed tables by ranking; baselines have the ``cold`` ranking only."""

    name: str
    tables: dict[str, list[Table]] = field(default_factory=dict)  # ranking -> per seed
    exposure: list[float] = field(default_factory=list)  # per seed: Mixed.exposure
    validation: list[float] = field(default_factory=list)  # per seed: cold validation nDCG@20
    seconds: float = 0.0

    @property
    def mean_exposure(self) -> float:
        return float(np.mean(self.exposure))

    def pooled(self, ranking: str) -> Table:
        per_seed = self.tables[ranking]
        return {k: np.mean([t[k] for t in per_seed], axis=0) for k in HEADLINE}


@dataclass(frozen=True)
class ColdComparison:
    """What the page says about the cold-item protocol."""

    rows: list[ColdRow]
    reference: str
    test_users: int
    test_items: int
    warm_items: int
    target_share: float  # held-out items' share of what the test users chose (the `all` base)
    summary: dict[str, dict[str, dict[str, Interval]]]  # ranking -> row -> metric
    diffs: dict[str, dict[str, dict[str, Interval]]]  # ranking -> row -> metric: ref - row
    seeds: tuple[int, ...]
    seconds: float


def warm_prepared(prepared: Prepared, split: ColdSplit) -> Prepared:
    """The warm data, split as every row trains, with its items' features."""
    meta = replace(prepared.meta, item_ids=split.warm.item_ids.tolist())
    features = prepared.features[split.warm_items - 1]
    return Prepared(split.warm, leave_last_out(split.warm), features, meta)


def run_cold(
    prepared: Prepared,
    plan: Plan,
    *,
    runner: Runner,
    refit: Callable[[ColdSplit], np.ndarray] | None = None,
) -> ColdComparison:
    """The plan's ``[cold]`` rows, each trained with every seed on the warm items (by
    ``runner``, side by side where it can), and the baselines, ranked for the test users (see
    the module doc). ``refit``: every item's features for the split, read by a backbone
    fitted on its warm items (else ``prepared``'s)."""
    assert plan.cold is not None
    started = time.perf_counter()
    split = cold_split(
        prepared.dataset, np.random.default_rng(plan.cold.seed), share=plan.cold.share
    )
    if refit is not None:
        prepared = replace(prepared, features=refit(split))
    warm = warm_prepared(prepared, split)
    seeds = plan.cold.seeds or plan.seeds
    runs = {
        name: [
            runner.submit(warm, seeded(plan.row(name).config, seed), f"cold {name}")
            for seed in seeds
        ]
        for name in plan.cold.rows
    }
    rows = _baselines(prepared, split, seeds)
    warm_task = holdout_task(warm.split, "standard")  # the same for every row and seed
    target_share = 0.0
    for name, futures in runs.items():
        row = ColdRow(name, {r: [] for r in RANKINGS})
        for seed, future in zip(seeds, futures, strict=True):
            fitted = future.result()
            target_share = _rank(row, fitted, warm_task, split, prepared, device=runner.device)
            row.seconds += fitted.seconds
            log.info("cold %s seed %d: %.0f s", name, seed, fitted.seconds)
        rows.append(row)
    summary, diffs = _intervals(rows, plan.cold.rows[0], plan)
    return ColdComparison(
        rows,
        plan.cold.rows[0],
        len(split.test.users),
        len(split.test_items),
        split.warm.n_items,
        target_share,
        summary,
        diffs,
        seeds,
        time.perf_counter() - started,
    )


def _rank(
    row: ColdRow,
    fitted: TrainResult,
    warm_task: Task,
    split: ColdSplit,
    prepared: Prepared,
    *,
    device: torch.device,
) -> float:
    """With a run trained on the warm items, add the held-out ones as ``POST /items`` adds
    them, rank the warm test items for ``warm_task``, and append the rankings' metrics to
    ``row``; the share of test targets among what the mixed ranking showed."""
    # serving is `standard`: the model as that protocol's validation chose to read it
    model = as_scored(fitted.model, fitted.validation, "standard")
    projection = fitted.projection
    if not isinstance(model, ACF) or not model.takes_new_items:
        raise ValueError(
            f"[cold] row {row.name!r} can score new items neither by their image nor by "
            "their metadata"
        )
    features = prepared.features  # raw, of items 1..N: the held-out ones are added from them
    tags = prepared.dataset.tags
    test = served_scores(
        model, projection, split.test, split.test_items, features, tags, device=device
    )
    row.tables["cold"].append(
        multi_target_metrics(test[:, split.warm.n_items :], split.test.targets)
    )
    mixed = mixed_ranking(split, split.test, test)
    row.tables["all"].append(mixed.metrics)
    row.exposure.append(mixed.exposure)
    row.tables["warm"].append(evaluate(model, warm_task, device=device))
    val = served_scores(
        model, projection, split.validation, split.validation_items, features, tags, device=device
    )
    row.validation.append(_validation(val[:, split.warm.n_items :], split.validation.targets))
    return float(mixed.chosen.mean())


def _baselines(prepared: Prepared, split: ColdSplit, seeds: Sequence[int]) -> list[ColdRow]:
    """Rows that rank the held-out items without training, the cold ranking only: random and
    metadata alone (genres; the words of title and genres), their ties broken at random with a
    generator per seed; the image alone, ranked once since it has no randomness."""

    def per_seed(name: str, scorer: Callable[..., np.ndarray]) -> ColdRow:
        row = ColdRow(name, {"cold": []})
        for seed in seeds:
            rng = np.random.default_rng([seed, 2])
            table, validation = _ranked(split, partial(scorer, rng=rng))
            row.tables["cold"].append(table)
            row.validation.append(validation)
        return row

    table, validation = _ranked(
        split, lambda part, items: image_scores(split, part, items, prepared.features)
    )
    rows = [
        per_seed("random", random_scores),
        ColdRow("image only", {"cold": [table] * len(seeds)}, validation=[validation] * len(seeds)),
    ]
    data = prepared.dataset
    if data.genres:
        rows.append(per_seed("genres only", partial(genre_scores, split, genres=data.genres)))
    if any(data.titles) or data.genres:
        texts = [
            " ".join([title, *(f"genre_{g}" for g in (data.genres[i] if data.genres else ()))])
            for i, title in enumerate(data.titles)
        ]
        rows.append(per_seed("title and genres (TF-IDF)", partial(text_scores, split, texts=texts)))
    return rows


def _ranked(
    split: ColdSplit, scorer: Callable[[ColdTargets, np.ndarray], np.ndarray]
) -> tuple[Table, float]:
    """A baseline's test metrics and its validation nDCG@20."""
    test = multi_target_metrics(scorer(split.test, split.test_items), split.test.targets)
    validation = scorer(split.validation, split.validation_items)
    return test, _validation(validation, split.validation.targets)


def _validation(scores: np.ndarray, targets: tuple[np.ndarray, ...]) -> float:
    return float(multi_target_metrics(scores, targets)["nDCG@20"].mean())


def _intervals(
    rows: list[ColdRow], reference: str, plan: Plan
) -> tuple[dict[str, dict[str, dict[str, Interval]]], dict[str, dict[str, dict[str, Interval]]]]:
    rng, n = np.random.default_rng(plan.bootstrap_seed), plan.n_resamples
    ref = next(r for r in rows if r.name == reference)
    summary: dict[str, dict[str, dict[str, Interval]]] = {}
    diffs: dict[str, dict[str, dict[str, Interval]]] = {}
    for ranking in RANKINGS:
        here = [r for r in rows if ranking in r.tables]
        summary[ranking] = {
            r.name: {k: bootstrap(v, rng=rng, n_resamples=n) for k, v in r.pooled(ranking).items()}
            for r in here
        }
        base = ref.pooled(ranking)
        diffs[ranking] = {
            r.name: {
                k: paired_bootstrap(base[k], v, rng=rng, n_resamples=n)
                for k, v in r.pooled(ranking).items()
            }
            for r in here
            if r is not ref
        }
    return summary, diffs
