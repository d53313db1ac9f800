"""Do posters read by a backbone fitted to the catalogue place new films better? Cold
validation says.

For each adaptation target (``genres``, ``taste``: service/offline/data/adapt.py) it fits the
backbone's last stage on the warm items of the reproduce plan's cold split (the held-out
items, validation and test, are never seen: ``taste`` reads the warm training interactions
only), extracts every item's features with the fitted weights, trains the plan's cold rows on
the warm items with each seed, adds the held-out items as ``POST /items`` does, and prints each
run's nDCG@20 on cold validation (new films among themselves) and on warm validation
(``standard``), beside the same rows on the shipped weights' features. The test half is never
ranked: this chooses; the page reports.

    .venv/bin/python benchmarks/backbone_adaptation.py DATA [--work runs/adapt]
        [--rows acf_metadata] [--targets genres,taste] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np

from service.offline.data.adapt import Target
from service.offline.experiments.cold import (
    ColdSplit,
    cold_split,
    multi_target_metrics,
    served_scores,
    warm_prepared,
)
from service.offline.experiments.plan import Plan, load_plan, seeded
from service.offline.experiments.reproduce import cold_features, prepare_with_features
from service.offline.training.pipeline import Prepared
from service.offline.training.runner import Runner, default_jobs
from service.offline.training.train import as_scored
from service.runtime import pick_device


def validation_figures(
    variants: dict[str, Prepared], split: ColdSplit, plan: Plan, rows: list[str], seeds: list[int]
) -> None:
    """Train each row with each seed on each variant's warm items and print its cold and warm
    validation nDCG@20, then the mean over seeds."""
    device = pick_device("auto")
    with Runner(device, jobs=default_jobs(device)) as runner:
        futures = {
            (name, row, seed): runner.submit(
                warm_prepared(prepared, split), seeded(plan.row(row).config, seed), f"{name} {row}"
            )
            for name, prepared in variants.items()
            for row in rows
            for seed in seeds
        }
        means: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for (name, row, seed), future in futures.items():
            fitted = future.result()
            model = as_scored(fitted.model, fitted.validation, "standard")
            prepared = variants[name]
            scores = served_scores(
                model,  # type: ignore[arg-type]  # the cold rows are ACF's
                fitted.projection,
                split.validation,
                split.validation_items,
                prepared.features,
                prepared.dataset.tags,
                device=device,
            )
            cold = multi_target_metrics(scores[:, split.warm.n_items :], split.validation.targets)
            figures = (float(cold["nDCG@20"].mean()), fitted.validation["nDCG@20"])
            means.setdefault((name, row), []).append(figures)
            print(f"{name:8} {row:16} seed {seed}: cold {figures[0]:.4f}  warm {figures[1]:.4f}")
    print("mean over seeds, nDCG@20 on validation:")
    for (name, row), runs in means.items():
        cold_mean, warm_mean = np.mean(runs, axis=0)
        print(f"  {name:8} {row:16} cold {cold_mean:.4f}  warm {warm_mean:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--work", type=Path, default=Path("runs/adapt"))
    parser.add_argument("--config", type=Path, default=Path("configs/reproduce.toml"))
    parser.add_argument("--rows", default="acf_metadata")
    parser.add_argument("--targets", default="genres,taste")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # each fit's losses
    plan = replace(load_plan(args.config), adapt=None)  # the shipped weights: the baseline
    assert plan.cold is not None, "the plan has no [cold] table"
    device = pick_device("auto")
    prepared = prepare_with_features(args.data, args.work, plan, device)
    split = cold_split(
        prepared.dataset, np.random.default_rng(plan.cold.seed), share=plan.cold.share
    )
    variants = {"shipped": prepared}
    for target in filter(None, args.targets.split(",")):  # --targets= : the shipped alone
        assert target in ("genres", "taste"), f"unknown target {target!r}"
        # fitted on the warm items, as `make reproduce`'s cold protocol does
        refit = cold_features(
            prepared, args.work, replace(plan, adapt=cast(Target, target)), device
        )
        assert refit is not None
        variants[target] = replace(prepared, features=refit(split))
    seeds = [int(s) for s in args.seeds.split(",")]
    validation_figures(variants, split, plan, args.rows.split(","), seeds)


if __name__ == "__main__":
    main()
