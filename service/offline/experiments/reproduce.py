"""``make reproduce``: features -> every row of the plan with every seed -> both protocols ->
``docs/results.md``, ``docs/results.json`` and ``docs/training.png``.

Each row is trained once per seed; the fitted baselines (popularity, transitions, EASE) have no
randomness and are fitted once. A row's figures are the mean over seeds of the per-seed means
over users, with the spread over seeds; its 95% interval and the paired comparison with the
reference row (ACF) bootstrap users' metrics averaged over the seeds. The same rows listed in
the plan's ``[synthetic]`` table run again on a generated world whose right answer is known, and
those in its ``[cold]`` table on the cold-item protocol (:mod:`service.offline.experiments.cold`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.model.acf import ACF
from service.model.checkpoint import SERVED, SERVED_FILE, save_checkpoint
from service.model.feature_store import BACKBONE_FILE, load_features
from service.offline.data.adapt import AdaptConfig, Target, fit_to
from service.offline.data.dataset import Dataset, Split, fingerprint, leave_last_out, load_dataset
from service.offline.data.features import extract_features
from service.offline.data.synthetic import World, make_world
from service.offline.evaluation.attention import heatmap_stats
from service.offline.evaluation.diversity import DiversityRow, diversity_rows
from service.offline.evaluation.evaluate import (
    PROTOCOLS,
    ProtocolName,
    Task,
    evaluate,
    holdout_task,
    rank_new_items,
)
from service.offline.evaluation.metrics import Interval, bootstrap, paired_bootstrap
from service.offline.experiments.cold import ColdSplit, run_cold, warm_prepared
from service.offline.experiments.plan import Plan, Row, seeded
from service.offline.experiments.plots import plot_history
from service.offline.experiments.report import (
    HEADLINE,
    Report,
    results_json,
    results_markdown,
)
from service.offline.experiments.results import (
    Comparison,
    Contest,
    ModelRun,
    RowResult,
    TailBucket,
)
from service.offline.training.config import FITTED, SERVING_METRIC, TrainConfig
from service.offline.training.pipeline import Prepared, prepare, to_checkpoint
from service.offline.training.runner import Runner
from service.offline.training.train import TrainResult, as_scored

log = logging.getLogger(__name__)

# The long tail: `standard`'s test users bucketed by their target's training interactions
TAIL_BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("≤ 5", 0, 5),
    ("6–20", 6, 20),
    ("> 20", 21, np.inf),
)
Fitted = tuple[TrainResult, TrainConfig]  # a run and its settings, for a checkpoint


@dataclass(frozen=True)
class NewItems:
    """Items added after training (the synthetic world's unlisted images) and their kinds; a
    user would pick those of their held-out item's kind."""

    features: np.ndarray  # (M, K, C) raw features
    kinds: np.ndarray  # (M,)
    item_kinds: np.ndarray  # (N,) kinds of the trained items 1..N

    def relevant(self, targets: np.ndarray) -> np.ndarray:
        """(U, M) bool: the new items of each held-out item's (1..N) kind."""
        return self.item_kinds[targets - 1][:, None] == self.kinds[None, :]


def reproduce(
    data_dir: Path, *, plan: Plan, work_dir: Path, docs_dir: Path, runner: Runner
) -> dict[str, Any]:
    """The plan's page for ``data_dir``, its runs trained by ``runner`` (side by side where it
    can: :class:`~service.offline.training.runner.Runner`)."""
    device = runner.device
    started = time.perf_counter()
    t0 = time.perf_counter()
    prepared = prepare_with_features(data_dir, work_dir, plan, device)
    plan = fittable(plan, prepared.dataset)  # what the features were read with, for the page
    feature_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    results, best = run_rows(prepared, plan, plan.main_rows, runner=runner)
    main = compare(data_dir.resolve().name, results, plan, tail=target_counts(prepared))
    training_seconds = time.perf_counter() - t0
    served, diversity = _save_served(prepared, plan, results, best, work_dir, device)
    refit = cold_features(prepared, work_dir, plan, device)
    cold = run_cold(prepared, plan, runner=runner, refit=refit) if plan.cold else None
    synthetic, world_seconds = None, 0.0
    if plan.synthetic is not None:
        t0 = time.perf_counter()
        synthetic = _synthetic(plan, work_dir, runner)
        world_seconds = time.perf_counter() - t0
    timings = {
        "features_s": feature_seconds,
        "training_and_evaluation_s": training_seconds,
        "cold_s": cold.seconds if cold else 0.0,
        "synthetic_s": world_seconds,
        "total_s": time.perf_counter() - started,
    }
    report = Report(
        main=main,
        synthetic=synthetic,
        plan=plan,
        n_users=prepared.split.n_users,
        n_items=prepared.split.n_items,
        timings=timings,
        device=str(device),
        jobs=runner.jobs,
        chosen=plan.settings_note(fingerprint(data_dir)),
        served=served or "",
        cold=cold,
        diversity=tuple(diversity),
    )
    plot_history(
        [r for row in results for r in row.runs if r.seed == plan.seeds[0]],
        docs_dir / "training.png",
    )
    payload = results_json(report)
    (docs_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (docs_dir / "results.md").write_text(results_markdown(report))
    return payload


def _save_served(
    prepared: Prepared,
    plan: Plan,
    results: list[RowResult],
    best: dict[str, Fitted],
    work_dir: Path,
    device: torch.device,
) -> tuple[str | None, list[DiversityRow]]:
    """Saves the reference row's checkpoint and the one to serve; returns the served row and
    what its diversity re-rank does on `standard`."""
    if plan.reference in best:
        save_checkpoint(
            work_dir / f"{plan.reference}.pt", to_checkpoint(prepared, *best[plan.reference])
        )
    served = served_row(results, best)
    if served is None:
        return None, []
    save_checkpoint(work_dir / SERVED_FILE, to_checkpoint(prepared, *best[served]))
    fitted = best[served][0]
    return served, diversity_rows(
        as_scored(fitted.model, fitted.validation, "standard"),
        holdout_task(prepared.split, "standard"),
        device=device,
        rng=np.random.default_rng(plan.bootstrap_seed),
        n_resamples=plan.n_resamples,
    )


def prepare_with_features(
    data_dir: Path, work_dir: Path, plan: Plan, device: torch.device
) -> Prepared:
    """The dataset split, with its features extracted by the plan's backbone into
    ``work_dir/features-<backbone>`` (a matching extraction there is reused or resumed); with
    the plan's ``adapt``, by the backbone fitted first to the items' genres or taste (the
    training part of the split) into ``features-<backbone>-<target>``, which keeps the
    fitted weights for the server (``BACKBONE_FILE``)."""
    dataset = load_dataset(data_dir)
    used = fittable(plan, dataset)
    if used is not plan:  # warned here, once: reproduce asks again for its page
        log.warning("%s: no item has genres, so the backbone is not fitted", dataset.root)
    plan = used
    features_dir = work_dir / f"features-{plan.backbone}"
    weights = plan.weights
    if plan.adapt is not None:
        features_dir = features_dir.with_name(f"{features_dir.name}-{plan.adapt}")
        weights = _fitted(dataset, leave_last_out(dataset), features_dir, plan.adapt)
    _extract(dataset, features_dir, plan, weights, device)
    return prepare(data_dir, features_dir)


def fittable(plan: Plan, dataset: Dataset) -> Plan:
    """``plan``, without its ``adapt`` when ``dataset`` has nothing to fit to (genres: none of
    its items has any): the backbone is then used as shipped."""
    if plan.adapt == "genres" and not any(dataset.genres):
        return replace(plan, adapt=None)
    return plan


def cold_features(
    prepared: Prepared, work_dir: Path, plan: Plan, device: torch.device
) -> Callable[[ColdSplit], np.ndarray] | None:
    """With the plan's ``adapt``: the features of every item read by a backbone fitted on a
    cold split's warm items only (new films are never fitted on), for :func:`run_cold`."""
    target = plan.adapt
    if target is None:
        return None

    def refit(split: ColdSplit) -> np.ndarray:
        warm = warm_prepared(prepared, split)
        out = work_dir / f"features-{plan.backbone}-{target}-cold"
        weights = _fitted(warm.dataset, warm.split, out, target)
        _extract(prepared.dataset, out, plan, weights, device)
        return load_features(out)[0]

    return refit


def _fitted(dataset: Dataset, split: Split, features_dir: Path, target: Target) -> Path:
    fitted = fit_to(dataset, split, features_dir / BACKBONE_FILE, AdaptConfig(target=target))
    read_out, kept = fitted.held_loss
    log.info(
        "backbone fitted to %s on %d posters in %.0f s: held-out loss %.4f (a read-out of the "
        "shipped grid %.4f), epoch %d",
        target, fitted.items, fitted.seconds, kept, read_out, fitted.best_epoch,
    )  # fmt: skip
    return fitted.weights


def _extract(
    dataset: Dataset, out: Path, plan: Plan, weights: Path | None, device: torch.device
) -> None:
    ids, paths = dataset.item_ids.tolist(), list(dataset.image_paths)
    extract_features(ids, paths, out, backbone=plan.backbone, weights=weights, device=device)


def run_rows(
    prepared: Prepared,
    plan: Plan,
    rows: tuple[Row, ...],
    *,
    runner: Runner,
    object_cover: np.ndarray | None = None,
    new_items: NewItems | None = None,
) -> tuple[list[RowResult], dict[str, Fitted]]:
    """Every row with every seed (trained by ``runner``, side by side where it can), evaluated
    under both protocols (and, for ACF rows that can, on ranking ``new_items``). Also returns,
    for each row the service can serve (ACF's and SASRec), its run with the best ``standard``
    validation nDCG@20 and that run's config."""
    runs = [
        (row, config, seeds, runner.submit(prepared, config, row.name))
        for row in rows
        for config, seeds in _runs_of(row, plan)
    ]
    tasks = {p: holdout_task(prepared.split, p) for p in PROTOCOLS}
    results = {row.name: RowResult(row.name, tables={p: [] for p in PROTOCOLS}) for row in rows}
    best: dict[str, Fitted] = {}
    for row, config, seeds, future in runs:
        fitted = future.result()
        result = results[row.name]
        for seed in seeds:
            result.runs.append(
                ModelRun(
                    row.name,
                    asdict(seeded(config, seed)),
                    fitted.seconds if seed == config.seed else 0.0,
                    fitted.best_epoch,
                    fitted.history,
                    seed,
                )
            )
        _evaluate_run(result, fitted, len(seeds), tasks, runner.device, object_cover, new_items)
        kept = best.get(row.name)
        if config.model in SERVED and (
            kept is None or fitted.validation[SERVING_METRIC] > kept[0].validation[SERVING_METRIC]
        ):
            best[row.name] = (fitted, config)
        log.info("%s seed %d: %.0f s", row.name, config.seed, fitted.seconds)
    return list(results.values()), best


def _runs_of(row: Row, plan: Plan) -> list[tuple[TrainConfig, tuple[int, ...]]]:
    """The runs a row needs, each with the seeds it stands for: one per seed, or one for every
    seed of a fitted baseline (no randomness)."""
    if row.config.model in FITTED:
        return [(seeded(row.config, plan.seeds[0]), plan.seeds)]
    return [(seeded(row.config, seed), (seed,)) for seed in plan.seeds]


def _evaluate_run(
    result: RowResult,
    fitted: TrainResult,
    seeds: int,
    tasks: dict[ProtocolName, Task],
    device: torch.device,
    object_cover: np.ndarray | None,
    new_items: NewItems | None,
) -> None:
    """One run's test tables under both protocols, its attention heatmap statistics (ACF with
    images) and its precision among ``new_items``, appended to ``result`` once for each of the
    ``seeds`` it stands for (evaluated once)."""
    scored = {p: as_scored(fitted.model, fitted.validation, p) for p in PROTOCOLS}
    for p, task in tasks.items():
        table = evaluate(scored[p], task, device=device)  # type: ignore[arg-type]
        result.tables[p] += [table] * seeds
    model, standard = scored["standard"], tasks["standard"]
    if isinstance(model, ACF) and model.uses_images:
        users, profiles = torch.as_tensor(standard.users), torch.as_tensor(standard.profiles)
        times = None if standard.times is None else torch.as_tensor(standard.times)
        stats = heatmap_stats(model, users, profiles, times=times, object_cover=object_cover)
        result.heatmaps += [stats] * seeds
    if new_items is not None and isinstance(model, ACF) and model.config.visual == "score":
        top = rank_new_items(model, fitted.projection, new_items.features, standard, device=device)
        relevant = new_items.relevant(standard.targets)
        result.new_items += [np.take_along_axis(relevant, top, axis=1).mean(1)] * seeds  # (U,)


def served_row(results: list[RowResult], servable: dict[str, Fitted]) -> str | None:
    """The row to serve: of those the service can serve, the best on `standard` validation
    (mean over seeds; the test split chooses nothing)."""
    rows = [r for r in results if r.name in servable]
    return max(rows, key=lambda r: r.validation).name if rows else None


def target_counts(prepared: Prepared) -> np.ndarray:
    """(U,) training interactions of each `standard` test user's target item."""
    split = prepared.split
    counts = np.bincount(split.train_items, minlength=split.n_items + 1)
    return counts[holdout_task(split, "standard").targets]


def compare(
    dataset: str, results: list[RowResult], plan: Plan, *, tail: np.ndarray | None = None
) -> Comparison:
    """Every row's figures and its paired difference to the reference; with ``tail`` (the
    :func:`target_counts` of `standard`'s users), the same by :data:`TAIL_BUCKETS` too."""
    rng = np.random.default_rng(plan.bootstrap_seed)
    reference = next(r for r in results if r.name == plan.reference)
    protocols: list[str] = list(PROTOCOLS)
    summary = {
        p: {
            r.name: {
                k: bootstrap(v, rng=rng, n_resamples=plan.n_resamples)
                for k, v in r.pooled(p).items()
            }
            for r in results
        }
        for p in protocols
    }
    spread = {
        p: {r.name: {k: float(np.std(v)) for k, v in r.seed_means(p).items()} for r in results}
        for p in protocols
    }
    for p in protocols:  # the point estimate is the mean of the seeds' means
        for r in results:
            for k, v in r.seed_means(p).items():
                iv = summary[p][r.name][k]
                summary[p][r.name][k] = Interval(float(np.mean(v)), iv.low, iv.high)
    diffs = {
        p: {
            r.name: {
                k: paired_bootstrap(
                    reference.pooled(p)[k], v, rng=rng, n_resamples=plan.n_resamples
                )
                for k, v in r.pooled(p).items()
            }
            for r in results
            if r.name != plan.reference
        }
        for p in protocols
    }
    ranked = {r.name: np.mean(r.new_items, axis=0) for r in results if r.new_items}
    new_items = {n: bootstrap(v, rng=rng, n_resamples=plan.n_resamples) for n, v in ranked.items()}
    new_diffs = {
        n: paired_bootstrap(ranked[plan.reference], v, rng=rng, n_resamples=plan.n_resamples)
        for n, v in ranked.items()
        if n != plan.reference and plan.reference in ranked
    }
    buckets = [] if tail is None else _tail(results, reference, tail, plan, rng)
    contest = _contest(results, plan, rng)
    return Comparison(
        dataset, results, summary, spread, diffs, new_items, new_diffs, buckets, contest
    )


def _contest(results: list[RowResult], plan: Plan, rng: np.random.Generator) -> Contest | None:
    """The ACF row best on `standard` validation (the test split chooses nothing) against
    the SASRec row, paired over users under each protocol; None without both."""

    def of(model: str) -> list[RowResult]:
        return [r for r in results if r.runs and r.runs[0].config.get("model") == model]

    acf, sasrec = of("acf"), of("sasrec")
    if not acf or not sasrec:
        return None
    best = max(acf, key=lambda r: r.validation)
    diffs: dict[str, dict[str, Interval]] = {
        p: {
            k: paired_bootstrap(v, sasrec[0].pooled(p)[k], rng=rng, n_resamples=plan.n_resamples)
            for k, v in best.pooled(p).items()
        }
        for p in PROTOCOLS
    }
    return Contest(best.name, sasrec[0].name, diffs)


def _tail(
    results: list[RowResult],
    reference: RowResult,
    counts: np.ndarray,
    plan: Plan,
    rng: np.random.Generator,
) -> list[TailBucket]:
    out, n = [], plan.n_resamples
    pooled = {r.name: r.pooled("standard") for r in results}
    ref = pooled[reference.name]
    for label, low, high in TAIL_BUCKETS:
        here = (counts >= low) & (counts <= high)
        if not here.any():
            continue
        summary = {
            name: {k: bootstrap(t[k][here], rng=rng, n_resamples=n) for k in HEADLINE}
            for name, t in pooled.items()
        }
        diffs = {
            name: {
                k: paired_bootstrap(ref[k][here], t[k][here], rng=rng, n_resamples=n)
                for k in HEADLINE
            }
            for name, t in pooled.items()
            if name != reference.name
        }
        out.append(TailBucket(label, int(here.sum()), summary, diffs))
    return out


def _synthetic(plan: Plan, work_dir: Path, runner: Runner) -> Comparison:
    assert plan.synthetic is not None
    device = runner.device
    root = work_dir / "synthetic-world"
    world = make_world(root, plan.synthetic.spec)  # deterministic: the same bytes each time
    # the world's genres name each item's kind, the answer its protocol checks: its images are
    # read by the backbone as shipped
    prepared = prepare_with_features(root, root, replace(plan, adapt=None), device)
    rows = tuple(
        Row(name, seeded(plan.row(name).config, 0, **plan.synthetic.train))
        for name in plan.synthetic.rows
    )
    results, _ = run_rows(
        prepared,
        plan,
        rows,
        runner=runner,
        object_cover=world.object_cover,
        new_items=_new_items(world, plan, device) if len(world.new_kinds) else None,
    )
    return compare("synthetic world", results, plan)


def _new_items(world: World, plan: Plan, device: torch.device) -> NewItems:
    """The world's unlisted images, featurised by the plan's backbone, with their kinds."""
    first = len(world.item_kinds) + 1
    ids = list(range(first, first + len(world.new_kinds)))
    out = world.root / f"new-features-{plan.backbone}"
    paths = [world.root / "new" / f"{i}.png" for i in ids]
    extract_features(ids, paths, out, backbone=plan.backbone, weights=plan.weights, device=device)
    features, _ = load_features(out)
    return NewItems(features, world.new_kinds, world.item_kinds)
