"""``make reproduce``: features -> ACF and baselines -> both protocols -> docs/results.*"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.model.checkpoint import save_checkpoint
from service.offline.data import load_dataset
from service.offline.evaluate import PROTOCOLS, evaluate, holdout_task
from service.offline.features import extract_features
from service.offline.metrics import Interval, paired_bootstrap, summarise
from service.offline.pipeline import fit, prepare, to_checkpoint
from service.offline.report import (
    DIFF_METRICS,
    ModelRun,
    plot_history,
    results_json,
    results_markdown,
)
from service.offline.train import MODELS, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What to run: the backbone and one training config per model."""

    backbone: str = "efficientnet_lite0"
    weights: Path | None = None
    configs: dict[str, TrainConfig] = field(default_factory=dict)
    n_resamples: int = 1000
    seed: int = 0


def load_plan(path: Path | None) -> Plan:
    """A TOML file with ``[features]``, ``[train]`` (shared) and ``[models.<name>]`` tables."""
    raw: dict[str, Any] = tomllib.loads(path.read_text()) if path else {}
    shared = raw.get("train", {})
    per_model = raw.get("models", {})
    unknown = sorted(set(per_model) - set(MODELS))
    if unknown:
        raise ValueError(f"{path}: unknown model(s) {', '.join(unknown)}")
    configs: dict[str, TrainConfig] = {
        m: TrainConfig.from_dict({**shared, **per_model.get(m, {}), "model": m}) for m in MODELS
    }
    feats = raw.get("features", {})
    weights = feats.get("weights")
    return Plan(
        backbone=feats.get("backbone", Plan.backbone),
        weights=Path(weights) if weights else None,
        configs=configs,
        seed=int(raw.get("seed", 0)),
    )


def reproduce(
    data_dir: Path, *, plan: Plan, work_dir: Path, docs_dir: Path, device: torch.device
) -> dict[str, Any]:
    started = time.perf_counter()
    dataset = load_dataset(data_dir)
    features_dir = work_dir / f"features-{plan.backbone}"
    t0 = time.perf_counter()
    extract_features(
        dataset.item_ids.tolist(),
        list(dataset.image_paths),
        features_dir,
        backbone=plan.backbone,
        weights=plan.weights,
        device=device,
    )
    feature_seconds = time.perf_counter() - t0
    prepared = prepare(data_dir, features_dir)
    runs, models = [], {}
    for name, config in plan.configs.items():
        t0 = time.perf_counter()
        result = fit(prepared, config, device=device)
        runs.append(
            ModelRun(
                name, asdict(config), time.perf_counter() - t0, result.best_epoch, result.history
            )
        )
        models[name] = result.model
        if name == "acf":
            save_checkpoint(work_dir / "acf.pt", to_checkpoint(prepared, result, config))
    t0 = time.perf_counter()
    tables = {
        p: {
            name: evaluate(m, holdout_task(prepared.split, p), device=device)  # type: ignore[arg-type]
            for name, m in models.items()
        }
        for p in PROTOCOLS
    }
    eval_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(plan.seed)
    summary: dict[str, dict[str, dict[str, Interval]]] = {
        p: {m: summarise(t, rng=rng, n_resamples=plan.n_resamples) for m, t in by_model.items()}
        for p, by_model in tables.items()
    }
    diffs: dict[str, dict[str, dict[str, Interval]]] = {
        p: _differences(by_model, rng, plan.n_resamples) for p, by_model in tables.items()
    }
    timings = {
        "features_s": feature_seconds,
        "evaluation_s": eval_seconds,
        "total_s": time.perf_counter() - started,
    }
    name = data_dir.resolve().name
    plot_history(runs, docs_dir / "training.png")
    payload = results_json(
        dataset=name,
        summary=summary,
        diffs=diffs,
        runs=runs,
        extra={
            "features": {"backbone": plan.backbone, "dir": str(features_dir)},
            "timings": timings,
            "bootstrap_seed": plan.seed,
            "device": str(device),
        },
    )
    notes = _notes(prepared.split.n_users, prepared.split.n_items, plan, timings, device)
    (docs_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (docs_dir / "results.md").write_text(
        results_markdown(
            dataset=name,
            summary=summary,
            diffs=diffs,
            runs=runs,
            defaults=asdict(TrainConfig()),
            notes=notes,
        )
    )
    return payload


def _differences(
    tables: dict[str, dict[str, np.ndarray]], rng: np.random.Generator, n_resamples: int
) -> dict[str, dict[str, Interval]]:
    acf = tables["acf"]
    return {
        m: {
            k: paired_bootstrap(acf[k], t[k], rng=rng, n_resamples=n_resamples)
            for k in DIFF_METRICS
        }
        for m, t in tables.items()
        if m != "acf"
    }


def _notes(
    n_users: int, n_items: int, plan: Plan, timings: dict[str, float], device: torch.device
) -> list[str]:
    return [
        f"{n_users} users, {n_items} items; leave-last-out split (last interaction = test, the "
        "one before = validation). Every model is ranked over the whole catalogue; ties count "
        "against the model. Backbone: "
        f"`{plan.backbone}`. Bootstrap: {plan.n_resamples} resamples of users, seed {plan.seed}.",
        "",
        "`seed` is the VisRec tutorial's protocol (profile = last 10 training items, only those "
        "removed from the ranking, AUC over the whole catalogue); `standard` gives the last 9 "
        "training items as the profile and removes all training and validation items.",
        "",
        f"Wall times on `{device}`: features {timings['features_s']:.0f} s, evaluation of all "
        f"models {timings['evaluation_s']:.1f} s, whole run {timings['total_s']:.0f} s. "
        "Training curves: `training.png`.",
    ]
