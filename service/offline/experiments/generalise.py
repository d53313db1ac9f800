"""``visrec generalise``: does what validation chose hold where it could not choose?

Two runs of the whole procedure (tune each row on validation with an equal budget, train it
with the plan's seeds, compare the reference ACF with SASRec on test), on splits of one dataset
where the judged part took no part in tuning:

- ``users``: settings chosen on the validation items of one half of the users (drawn with the
  plan's bootstrap seed), figures from the test items of the other half (user-disjoint);
- ``time``: everything before a cut date is the dataset (trained, validated, tuned); each
  user's first interaction after the cut is their test item (:func:`~service.offline.data.dataset.
  split_at`; the cut is the timestamp quantile that leaves the most users a test item).

The page (``docs/generalisation.md``) says whether each check agrees in sign with the main
results page of the same dataset (``docs/results.json``), when there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.offline.data.dataset import Split, busiest_cut, split_at, user_disjoint
from service.offline.evaluation.metrics import HEADLINE, Interval
from service.offline.experiments.figures import interval, signed_interval
from service.offline.experiments.plan import Plan, Row
from service.offline.experiments.reproduce import compare, prepare_with_features, run_rows
from service.offline.experiments.results import Comparison
from service.offline.experiments.sweep import Settings, SweepPlan, best_settings, sweep
from service.offline.training.pipeline import Prepared
from service.offline.training.runner import Runner

PROTOCOLS = ("standard", "seed")  # the order of the page's columns


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    validation_users: int
    test_users: int
    tuned: dict[str, Settings]  # per row: the changes its tuning chose
    comparison: Comparison


def generalise(
    data_dir: Path,
    *,
    sweep_plan: SweepPlan,
    work_dir: Path,
    docs_dir: Path,
    runner: Runner,
    budget: int,
    rows: tuple[str, ...] = ("acf", "sasrec"),
    seeds: tuple[int, ...] | None = None,
) -> list[Check]:
    """Both checks for ``rows`` (the first is the reference), each trained with ``seeds``
    (default: the plan's); writes the page and returns the checks."""
    plan = replace(sweep_plan.base, seeds=seeds or sweep_plan.base.seeds)
    for name in rows:
        plan.row(name)
    prepared = prepare_with_features(data_dir, work_dir, plan, runner.device)
    splits = _splits(prepared, np.random.default_rng(plan.bootstrap_seed))
    searched = replace(
        sweep_plan,
        budget=budget,
        spaces={r: s for r, s in sweep_plan.spaces.items() if r in rows},
        compare={},
    )
    checks = []
    for name, (split, words) in splits.items():
        here = replace(prepared, split=split)
        trials = sweep(
            data_dir,
            plan=searched,
            work_dir=work_dir,
            docs_dir=work_dir / "generalise" / name,
            runner=runner,
            prepared=here,
        )
        tuned = best_settings(trials)
        checks.append(
            Check(
                name,
                words,
                len(split.val_users),
                len(split.test_users),
                tuned,
                _judge(here, replace(plan, reference=rows[0]), rows, tuned, runner),
            )
        )
    main = _main_differences(docs_dir / "results.json", data_dir.resolve().name)
    page = generalisation_markdown(
        data_dir.resolve().name, checks, rows, main, budget=budget, seeds=plan.seeds
    )
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "generalisation.md").write_text(page)
    return checks


def _splits(prepared: Prepared, rng: np.random.Generator) -> dict[str, tuple[Split, str]]:
    """The user-disjoint split and the split in time, each with what it means."""
    cut = busiest_cut(prepared.dataset)
    when = datetime.fromtimestamp(cut, UTC).strftime("%Y-%m-%d %H:%M")
    return {
        "users": (
            user_disjoint(prepared.split, rng),
            "settings chosen on the validation items of half of the users, figures from the "
            "test items of the other half",
        ),
        "time": (
            split_at(prepared.dataset, cut),
            f"trained, validated and tuned on what happened before {when} UTC; each user's "
            "first interaction after it is their test item",
        ),
    }


def _judge(
    prepared: Prepared,
    plan: Plan,
    rows: tuple[str, ...],
    tuned: dict[str, Settings],
    runner: Runner,
) -> Comparison:
    chosen = tuple(Row(r, replace(plan.row(r).config, **tuned.get(r, {}))) for r in rows)
    results, _ = run_rows(prepared, plan, chosen, runner=runner)
    return compare("check", results, plan)


def _main_differences(path: Path, dataset: str) -> dict[str, dict[str, Any]] | None:
    """The main page's reference − row differences, when it is of this dataset."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("dataset") != dataset:
        return None
    diffs: dict[str, dict[str, Any]] = saved["difference_to_reference_95"]
    return diffs


def _sign(iv: Interval) -> int:
    return 1 if iv.low > 0 else -1 if iv.high < 0 else 0


def _words(sign: int) -> str:
    return {1: "ahead", -1: "behind", 0: "level (interval includes zero)"}[sign]


def generalisation_markdown(
    dataset: str,
    checks: list[Check],
    rows: tuple[str, ...],
    main: dict[str, dict[str, Any]] | None,
    *,
    budget: int,
    seeds: tuple[int, ...],
) -> str:
    ref, other = rows[0], rows[1]
    tuning = (
        "1 tuning run per row: the plan's settings, so nothing was tuned"
        if budget == 1
        else f"{budget} tuning runs per row (the plan's settings and {budget - 1} from its grid)"
    )
    lines = [
        f"# Does it hold where it was not tuned? (`{dataset}`)",
        "",
        f"Each check runs the whole procedure again on a split of `{dataset}`: every row gets "
        "the same budget of tuning runs on that split's validation, is trained with the plan's "
        "seeds, and is judged on that split's test items, which took no part in tuning. Figures "
        "as on the results page: mean over seeds, [95% bootstrap interval over users], "
        f"differences `{ref}` − row paired over users. This run: {tuning}; seeds "
        f"{', '.join(map(str, seeds))}.",
        "",
    ]
    for check in checks:
        c = check.comparison
        lines += [
            f"## `{check.name}`: {check.description}",
            "",
            f"{check.validation_users} users validate (tune and stop early), "
            f"{check.test_users} are tested. Settings chosen: "
            + "; ".join(
                f"`{r}`: {', '.join(f'{k}={v}' for k, v in ch.items()) or 'as in the plan'}"
                for r, ch in check.tuned.items()
            )
            + ".",
            "",
            "| row | " + " | ".join(f"`{p}` {m}" for p in PROTOCOLS for m in HEADLINE) + " |",
            "|---|" + "---|" * (len(PROTOCOLS) * len(HEADLINE)),
        ]
        for name in rows:
            cells = [interval(c.summary[p][name][m]) for p in PROTOCOLS for m in HEADLINE]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for name in rows[1:]:
            cells = [signed_interval(c.diffs[p][name][m]) for p in PROTOCOLS for m in HEADLINE]
            lines.append(f"| `{ref}` − `{name}` | " + " | ".join(cells) + " |")
        lines += ["", *_agreement(check, ref, other, main), ""]
    return "\n".join(lines) + "\n"


def _agreement(
    check: Check, ref: str, other: str, main: dict[str, dict[str, Any]] | None
) -> list[str]:
    out = []
    for p in PROTOCOLS:
        for m in HEADLINE:
            here = _sign(check.comparison.diffs[p][other][m])
            line = f"- `{p}` {m}: `{ref}` is {_words(here)} of `{other}` here"
            if main is not None and other in main.get(p, {}):
                mean, low, high = main[p][other][m]
                there = _sign(Interval(mean, low, high))
                verdict = "agrees" if here == there else "does not agree"
                line += f"; on the results page {_words(there)}: {verdict}"
            out.append(line + ".")
    return out
