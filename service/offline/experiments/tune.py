"""``visrec tune``: settings chosen on one dataset's own validation, written as its plan.

The sweep (:mod:`service.offline.experiments.sweep`: every row the same budget of training runs,
each stopped early on validation nDCG@20, the test split never read) runs on the dataset, and the
best settings of each row become ``runs/<dataset>/plan.toml``: a plan whose ``base`` is the
sweep's base plan (its rows, seeds, synthetic world) and whose rows carry what this dataset's
validation chose, with ``[tuned]`` saying where. ``visrec reproduce`` uses that plan when it
exists for the data it is given, and tunes first when no plan was tuned on it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from service.offline.data.dataset import fingerprint
from service.offline.experiments.plan import load_plan
from service.offline.experiments.sweep import Settings, SweepPlan, best_settings, sweep
from service.offline.training.runner import Runner

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 4  # runs per row: the plan's settings and 3 draws from the row's grid


def tuned_plan_path(work_dir: Path) -> Path:
    return work_dir / "plan.toml"


def tune(
    data_dir: Path,
    *,
    sweep_plan: SweepPlan,
    work_dir: Path,
    runner: Runner,
    budget: int | None = None,
) -> Path:
    """Sweep ``data_dir``'s validation (``budget`` runs per row; default the sweep plan's) and
    write its plan; returns the plan's path. The sweep's page goes to ``work_dir/tune``."""
    plan = replace(sweep_plan, budget=budget or sweep_plan.budget, compare={})
    pages = work_dir / "tune"
    trials = sweep(data_dir, plan=plan, work_dir=work_dir, docs_dir=pages, runner=runner)
    path = tuned_plan_path(work_dir)
    by = (
        f"`visrec tune` on this dataset's validation: {plan.budget} runs per row, seed "
        f"{plan.seed} ({pages / 'sweep.md'})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        tuned_plan_text(
            os.path.relpath(plan.base_path.resolve(), path.parent.resolve()),
            best_settings(trials),
            dataset=data_dir.resolve().name,
            fingerprint=fingerprint(data_dir),
            by=by,
        )
    )
    log.info("tuned plan for %s: %s", data_dir, path)
    return path


def tuned_plan_text(
    base: str, best: dict[str, Settings], *, dataset: str, fingerprint: str, by: str
) -> str:
    lines = [
        f"# Written by `visrec tune` on {dataset}: the rows of {base} with the settings this",
        "# dataset's validation chose. `visrec reproduce` on the same data uses it.",
        f"base = {json.dumps(base)}",
        "",
        "[tuned]",
        f"dataset = {json.dumps(dataset)}",
        f"fingerprint = {json.dumps(fingerprint)}",
        f"by = {json.dumps(by)}",
    ]
    for row, changes in best.items():
        lines += ["", f"[models.{row}]" + ("" if changes else "  # as in the base plan")]
        lines += [f"{k} = {json.dumps(v)}" for k, v in changes.items()]
    return "\n".join(lines) + "\n"


def plan_for(data_dir: Path, work_dir: Path, default: Path) -> Path | None:
    """The plan tuned on ``data_dir``: its own in ``work_dir``, else ``default`` when that was
    tuned on the same data; None when neither was (the caller tunes)."""
    here = fingerprint(data_dir)
    for path in (tuned_plan_path(work_dir), default):
        if path.is_file() and load_plan(path).tuned_on(here):
            return path
    return None
