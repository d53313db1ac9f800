"""``make sweep``: a small, equal-budget search of every model's settings on validation.

Each row of the base plan gets the same number of training runs (``budget``): first the row as
the plan configures it, then settings drawn without replacement from the row's grid in
``[space.<row>]``. Every run stops early on validation nDCG@20 (the mean of both protocols');
the test split is never read. ``[compare.<row>]`` lists one-factor comparisons (e.g. the loss),
each value run once on top of the row's settings. The results go to ``docs/sweep.md`` and
``docs/sweep.json``, with the best settings of each row written as a TOML table to paste into
the plan.

A sweep takes an hour or more on a small machine, so it resumes: a run that finds
``sweep.json`` from the same dataset and seed keeps the trials whose row settings have not
changed since and runs only the rest (lowering ``budget`` keeps a prefix of the same draws;
pasting a row's best settings into the plan redraws that row alone).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import tomllib
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from service.offline.experiments.plan import Plan, load_plan
from service.offline.experiments.reproduce import prepare_with_features
from service.offline.training.config import SELECTION_METRIC, TrainConfig
from service.offline.training.pipeline import Prepared
from service.offline.training.runner import Runner
from service.offline.training.train import TrainResult

log = logging.getLogger(__name__)

Settings = dict[str, Any]


@dataclass(frozen=True)
class SweepPlan:
    base: Plan
    base_path: Path  # the plan file ``base`` was read from
    budget: int = 8
    seed: int = 0
    spaces: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    compare: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Trial:
    row: str
    changes: Settings  # against the row's settings in the base plan
    validation: dict[str, float]
    best_epoch: int
    epochs_run: int
    seconds: float
    kind: str = "search"  # or "compare"
    planned: str = ""  # fingerprint of the row's plan settings the changes apply to


def load_sweep(path: Path) -> SweepPlan:
    raw = tomllib.loads(path.read_text())
    base_path = path.parent / raw["base"]
    base = load_plan(base_path)
    spaces, compare = raw.get("space", {}), raw.get("compare", {})
    for name in (*spaces, *compare):
        base.row(name)
    known = {f for f in TrainConfig.__dataclass_fields__}
    for table in (*spaces.values(), *compare.values()):
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{path}: unknown training setting(s) {', '.join(unknown)}")
    return SweepPlan(
        base, base_path, int(raw.get("budget", 8)), int(raw.get("seed", 0)), spaces, compare
    )


def candidates(
    space: dict[str, list[Any]],
    budget: int,
    rng: np.random.Generator,
    planned: Settings | None = None,
) -> list[Settings]:
    """The row as configured ({}), then up to ``budget - 1`` distinct grid points other than
    the ``planned`` values, drawn uniformly without replacement (the whole grid when smaller)."""
    keys = sorted(space)
    grid = [
        point
        for values in itertools.product(*(space[k] for k in keys))
        if (point := dict(zip(keys, values, strict=True))) != planned
    ]
    picks = rng.permutation(len(grid))[: max(budget - 1, 0)]
    return [{}, *(grid[i] for i in sorted(picks))]


def sweep(
    data_dir: Path,
    *,
    plan: SweepPlan,
    work_dir: Path,
    docs_dir: Path,
    runner: Runner,
    prepared: Prepared | None = None,
) -> list[Trial]:
    """Every trial of ``plan`` on ``data_dir``'s validation (or on ``prepared``'s: another
    split of it), trained by ``runner`` (side by side where it can), resuming from
    ``docs_dir/sweep.json``, which is rewritten as each trial ends."""
    planned = [
        (name, changes, "search")
        for name, space in plan.spaces.items()
        for changes in candidates(
            space, plan.budget, _row_rng(plan.seed, name), _planned(plan, name, space)
        )
    ] + [
        (name, {key: value}, "compare")
        for name, factors in plan.compare.items()
        for key, values in factors.items()
        for value in values
    ]
    done = _earlier_trials(docs_dir / "sweep.json", data_dir, plan)
    keys = [_key(name, changes, kind, _fingerprint(plan, name)) for name, changes, kind in planned]
    ended = {i: done[k] for i, k in enumerate(keys) if k in done}
    for i in ended:
        log.info("sweep %s %s: kept from the earlier run", planned[i][0], planned[i][1] or "-")
    lock = threading.Lock()

    def record(i: int, result: TrainResult) -> None:
        """Trial ``i`` written as it ends (on the runner's thread, or below for a trial whose
        result was read before its callback ran), with the earlier trials kept."""
        with lock:
            if i not in ended:
                ended[i] = _trial(result, plan, *planned[i])
                _write([ended[j] for j in sorted(ended)], plan, data_dir, docs_dir)

    futures: dict[int, Future[TrainResult]] = {}
    for i, (name, changes, _) in enumerate(planned):
        if i not in ended:
            prepared = prepared or prepare_with_features(
                data_dir, work_dir, plan.base, runner.device
            )
            config = replace(plan.base.row(name).config, seed=plan.seed, **changes)
            futures[i] = runner.submit(prepared, config, f"sweep {name}")
            futures[i].add_done_callback(partial(_when_done, record, i))
    for i, future in futures.items():
        record(i, future.result())  # a run's error is raised here
    return [ended[i] for i in range(len(planned))]


def _when_done(
    record: Callable[[int, TrainResult], None], i: int, future: Future[TrainResult]
) -> None:
    if future.exception() is None:  # an error is raised where the trials are gathered
        record(i, future.result())


def _row_rng(seed: int, name: str) -> np.random.Generator:
    """Each row draws on its own, so changing one row's plan or grid redraws that row only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _planned(plan: SweepPlan, name: str, space: dict[str, list[Any]]) -> Settings:
    config = plan.base.row(name).config
    return {k: getattr(config, k) for k in space}


def _fingerprint(plan: SweepPlan, name: str) -> str:
    config = replace(plan.base.row(name).config, seed=plan.seed)
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


def _key(name: str, changes: Settings, kind: str, planned: str) -> str:
    return json.dumps([name, changes, kind, planned], sort_keys=True)


def _earlier_trials(path: Path, data_dir: Path, plan: SweepPlan) -> dict[str, Trial]:
    """Trials of an earlier run of this sweep that still apply (same dataset and seed)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("dataset") != data_dir.resolve().name or saved.get("seed") != plan.seed:
        return {}
    # Trials from before epochs were chosen on both protocols lack the selection metric.
    trials = (
        Trial(**t)
        for t in saved.get("trials", [])
        if "planned" in t and SELECTION_METRIC in t["validation"]
    )
    return {_key(t.row, t.changes, t.kind, t.planned): t for t in trials}


def _trial(result: TrainResult, plan: SweepPlan, name: str, changes: Settings, kind: str) -> Trial:
    trial = Trial(
        name,
        changes,
        {k: v for k, v in result.validation.items() if "@" in k},
        result.best_epoch,
        len(result.history) if result.best_epoch else 0,
        result.seconds,
        kind,
        _fingerprint(plan, name),
    )
    log.info("sweep %s %s: %s", name, changes or "(as planned)", trial.validation)
    return trial


def best_settings(trials: list[Trial]) -> dict[str, Settings]:
    """Per row, the searched settings with the highest ``SELECTION_METRIC``."""
    best: dict[str, Trial] = {}
    for t in trials:
        if t.kind == "search" and (
            t.row not in best
            or t.validation[SELECTION_METRIC] > best[t.row].validation[SELECTION_METRIC]
        ):
            best[t.row] = t
    return {row: t.changes for row, t in best.items()}


def _write(trials: list[Trial], plan: SweepPlan, data_dir: Path, docs_dir: Path) -> None:
    """Rewritten after every trial, so a long sweep shows its progress and survives a stop."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    dataset = data_dir.resolve().name
    payload = {
        "dataset": dataset,
        "budget": plan.budget,
        "seed": plan.seed,
        "trials": [asdict(t) for t in trials],
        "best": best_settings(trials),
    }
    (docs_dir / "sweep.json").write_text(json.dumps(payload, indent=2) + "\n")
    (docs_dir / "sweep.md").write_text(sweep_markdown(trials, plan, dataset))


def sweep_markdown(trials: list[Trial], plan: SweepPlan, dataset: str) -> str:
    lines = [
        f"# Sweep on `{dataset}` (validation only)",
        "",
        f"Every row gets the same budget: {plan.budget} training runs (fewer when its grid is "
        f"smaller), seed {plan.seed}, each stopped early on validation nDCG@20 averaged over "
        "the `standard` and `seed` protocols, which also compares the runs; the first run of a "
        "row is its setting in the plan. The test split is not read. Settings are shown "
        "as changes to the row's plan settings; the best of each row is marked **best**.",
        "",
    ]
    best = best_settings(trials)
    for row in dict.fromkeys(t.row for t in trials):
        lines += [
            f"## {row}",
            "",
            "| kind | settings | val nDCG@20, mean | `standard` | `seed` | `standard` R@20 "
            "| best epoch | epochs run | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in sorted(
            (t for t in trials if t.row == row),
            key=lambda t: (t.kind, -t.validation[SELECTION_METRIC]),
        ):
            label = ", ".join(f"{k}={v}" for k, v in t.changes.items()) or "(as planned)"
            mark = " **best**" if t.kind == "search" and t.changes == best.get(row) else ""
            lines.append(
                f"| {t.kind} | {label}{mark} | {t.validation[SELECTION_METRIC]:.4f} | "
                f"{t.validation['nDCG@20']:.4f} | {t.validation['seed nDCG@20']:.4f} | "
                f"{t.validation['R@20']:.4f} | {t.best_epoch} | {t.epochs_run} | {t.seconds:.0f} |"
            )
        lines.append("")
    lines += ["## Best settings, as plan tables", "", "```toml"]
    for row, changes in best.items():
        lines.append(f"[models.{row}]  # changes found by the sweep")
        lines += [f"{k} = {json.dumps(v)}" for k, v in changes.items()]
        lines.append("")
    return "\n".join([*lines, "```"]) + "\n"
