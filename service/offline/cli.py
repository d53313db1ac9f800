"""``visrec``: the offline pipeline's command line (features, train, evaluate, reproduce)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.model.backbones import BACKBONES, DEFAULT_BACKBONE
from service.model.checkpoint import SERVED, load_checkpoint, save_checkpoint
from service.model.feature_store import FeatureError, load_features
from service.offline.data.dataset import DatasetError, load_dataset
from service.offline.data.features import extract_features
from service.offline.evaluation.evaluate import PROTOCOLS, evaluate, holdout_task
from service.offline.evaluation.metrics import HEADLINE, summarise
from service.offline.experiments.figures import signed_interval
from service.offline.experiments.generalise import generalise
from service.offline.experiments.plan import DEFAULT_PLAN, load_plan
from service.offline.experiments.plots import plot_history
from service.offline.experiments.reproduce import reproduce
from service.offline.experiments.results import ModelRun
from service.offline.experiments.sweep import best_settings, load_sweep, sweep
from service.offline.experiments.tune import DEFAULT_BUDGET, plan_for, tune
from service.offline.registry_cli import (
    Subcommands,
    experiment_command,
    publish_command,
    rollback_command,
)
from service.offline.training import distributed
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import (
    PipelineError,
    fit,
    prepare,
    to_checkpoint,
    training_state_path,
)
from service.offline.training.runner import Runner, default_jobs
from service.offline.training.train import as_scored
from service.runtime import keep_freed_memory, pick_device

log = logging.getLogger("visrec")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        args.run(args)
    except (DatasetError, FeatureError, PipelineError, ValueError) as err:
        log.error("%s", err)
        return 2
    return 0


def _default_work_dir(data: Path) -> Path:
    return Path("runs") / data.resolve().name


def _features(args: argparse.Namespace) -> None:
    dataset = load_dataset(args.data)
    out = args.out or _default_work_dir(args.data) / f"features-{args.backbone}"
    meta = extract_features(
        dataset.item_ids.tolist(),
        list(dataset.image_paths),
        out,
        backbone=args.backbone,
        weights=args.weights,
        batch_size=args.batch_size,
        device=pick_device(args.device),
        num_workers=args.workers,
    )
    print(
        f"features: {out} ({len(meta.item_ids)} items, {meta.backbone}, "
        f"{meta.grid}x{meta.grid}x{meta.feature_dim})"
    )


def _train(args: argparse.Namespace) -> None:
    values: dict[str, Any] = (
        tomllib.loads(args.config.read_text()).get("train", {}) if args.config else {}
    )
    values.update(
        {
            f.name: getattr(args, f.name)
            for f in fields(TrainConfig)
            if getattr(args, f.name) is not None
        }
    )
    config = TrainConfig.from_dict(values)
    device = distributed.init_from_env(pick_device(args.device))  # under torchrun: its group
    try:
        _train_and_save(args, config, device)
    finally:
        distributed.close()


def _train_and_save(args: argparse.Namespace, config: TrainConfig, device: torch.device) -> None:
    work = _default_work_dir(args.data)
    prepared = prepare(args.data, args.features or work / f"features-{DEFAULT_BACKBONE}")
    out = args.out or work / f"{config.model}.pt"
    state = training_state_path(out)
    main = distributed.is_main()
    if state.is_file() and not args.resume and main:
        print(f"{state} holds an interrupted run; starting over (--resume continues it)")
    result = fit(prepared, config, device=device, state_path=state, resume=args.resume)
    if not main:
        return
    if config.model not in SERVED:  # the other baselines are for comparison only
        print(f"{config.model}: validation {_figures(result.validation)} (no checkpoint)")
        state.unlink(missing_ok=True)
        return
    save_checkpoint(out, to_checkpoint(prepared, result, config))
    state.unlink(missing_ok=True)  # the run is complete: the checkpoint replaces it
    plot_history(
        [ModelRun(config.model, asdict(config), 0.0, result.best_epoch, result.history)],
        out.with_suffix(".png"),
    )
    print(
        f"checkpoint: {out} (best epoch {result.best_epoch}: {_figures(result.validation)}); "
        f"curves: {out.with_suffix('.png')}"
    )


def _figures(validation: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in validation.items() if "@" in k)


def _evaluate(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    prepared = prepare(args.data, args.features)
    features, meta = load_features(args.features)
    model = ckpt.build_model(features, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids).to(
        device
    )
    rng = np.random.default_rng(0)
    out = {}
    for protocol in args.protocol or PROTOCOLS:
        scored = as_scored(model, ckpt.validation, protocol)
        table = evaluate(scored, holdout_task(prepared.split, protocol), device=device)  # type: ignore[arg-type]
        out[protocol] = {k: asdict(iv) for k, iv in summarise(table, rng=rng).items()}
    print(json.dumps(out, indent=2))


def _reproduce(args: argparse.Namespace) -> None:
    work = args.work_dir or _default_work_dir(args.data)
    args.docs.mkdir(parents=True, exist_ok=True)
    config = args.config or plan_for(args.data, work, DEFAULT_PLAN)
    if config is None:
        print(
            f"no plan was tuned on {args.data}: choosing its settings on its own validation "
            f"first (visrec tune, {args.budget} runs per row)"
        )
        config = _run_tune(args, work)
    print(f"plan: {config}")
    with _runner(args) as runner:
        payload = reproduce(
            args.data, plan=load_plan(config), work_dir=work, docs_dir=args.docs, runner=runner
        )
    for protocol, models in payload["protocols"].items():
        print(f"[{protocol}] mean over seeds {payload['seeds']}")
        for name, metrics in models.items():
            print(
                f"  {name:14s} "
                + "  ".join(f"{k} {metrics[k]:.4f}" for k in ("AUC", "R@20", "nDCG@20"))
            )
    print(
        f"results: {args.docs / 'results.md'}, {args.docs / 'results.json'} "
        f"({payload['timings']['total_s'] / 60:.1f} min)"
    )


def _run_tune(args: argparse.Namespace, work: Path) -> Path:
    with _runner(args) as runner:
        return tune(
            args.data,
            sweep_plan=load_sweep(args.sweep),
            work_dir=work,
            runner=runner,
            budget=args.budget,
        )


def _runner(args: argparse.Namespace) -> Runner:
    """What trains a command's runs: ``--jobs`` of them side by side."""
    device = pick_device(args.device)
    jobs = default_jobs(device) if args.jobs is None else args.jobs
    runner = Runner(device, jobs=jobs)
    if jobs > 1:
        print(f"training {jobs} runs side by side, {runner.threads} thread(s) each")
    return runner


def _tune(args: argparse.Namespace) -> None:
    path = _run_tune(args, args.work_dir or _default_work_dir(args.data))
    print(f"tuned plan: {path} (`visrec reproduce {args.data}` uses it)")


def _generalise(args: argparse.Namespace) -> None:
    with _runner(args) as runner:
        checks = generalise(
            args.data,
            sweep_plan=load_sweep(args.sweep),
            work_dir=args.work_dir or _default_work_dir(args.data),
            docs_dir=args.docs,
            runner=runner,
            budget=args.budget,
            rows=tuple(args.rows.split(",")),
            seeds=tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None,
        )
    ref, other = args.rows.split(",")[:2]
    for check in checks:
        for protocol, rows in check.comparison.diffs.items():
            d = rows[other]
            print(
                f"  {check.name:6s} {protocol:8s} {ref} - {other}: "
                + "  ".join(f"{k} {signed_interval(d[k])}" for k in HEADLINE)
            )
    print(f"generalisation: {args.docs / 'generalisation.md'}")


def _sweep(args: argparse.Namespace) -> None:
    work = args.work_dir or _default_work_dir(args.data)
    with _runner(args) as runner:
        trials = sweep(
            args.data,
            plan=load_sweep(args.config),
            work_dir=work,
            docs_dir=args.docs,
            runner=runner,
        )
    for row, changes in best_settings(trials).items():
        print(f"  {row:14s} best: {changes or '(as planned)'}")
    print(f"sweep: {args.docs / 'sweep.md'}, {args.docs / 'sweep.json'}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visrec", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="command")
    for add in (
        _features_command,
        _train_command,
        publish_command,
        rollback_command,
        experiment_command,
        _evaluate_command,
        _reproduce_command,
        _tune_command,
        _generalise_command,
        _sweep_command,
    ):
        add(sub)
    return parser


def _features_command(sub: Subcommands) -> None:
    p = sub.add_parser("features", help="turn the items' images into component features")
    _data_arg(p)
    p.add_argument("--out", type=Path, help="output folder (default runs/<dataset>/features-…)")
    p.add_argument("--backbone", choices=BACKBONES, default=DEFAULT_BACKBONE)
    p.add_argument("--weights", type=Path, help="local weights file (needed for resnet50 offline)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader processes that decode images while the network runs (default 0: "
        "decode in this process; see benchmarks/feature_extraction.py)",
    )
    p.set_defaults(run=_features)


def _train_command(sub: Subcommands) -> None:
    p = sub.add_parser("train", help="train one model and write a checkpoint")
    _data_arg(p)
    p.add_argument("--features", type=Path, help="feature folder (default: the default backbone's)")
    p.add_argument("--config", type=Path, help="TOML file; its [train] table sets defaults")
    p.add_argument("--out", type=Path, help="checkpoint path (default runs/<dataset>/<model>.pt)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that stopped before writing --out (its state is saved next to "
        "it after every epoch, as <out>.state.pt); only --epochs may differ",
    )
    _config_flags(p)
    p.set_defaults(run=_train)


def _evaluate_command(sub: Subcommands) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint under both protocols")
    _data_arg(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--protocol", choices=PROTOCOLS, action="append")
    p.set_defaults(run=_evaluate)


def _reproduce_command(sub: Subcommands) -> None:
    p = sub.add_parser("reproduce", help="features, ACF and baselines, results page")
    _data_arg(p)
    p.add_argument(
        "--config",
        type=Path,
        help="TOML plan ([features], [train], [models.*]); default: the plan tuned on this "
        f"dataset (runs/<dataset>/plan.toml, or {DEFAULT_PLAN} when it was tuned on it), "
        "else `visrec tune` makes one first",
    )
    _tune_args(p)
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.set_defaults(run=_reproduce)


def _tune_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "tune", help="choose every row's settings on this dataset's validation: its plan"
    )
    _data_arg(p)
    _tune_args(p)
    p.set_defaults(run=_tune)


def _generalise_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "generalise",
        help="tune and compare again on user-disjoint and later-in-time splits of the data",
    )
    _data_arg(p)
    _tune_args(p)
    p.add_argument(
        "--rows",
        default="acf,sasrec",
        help="plan rows to tune and compare, the reference first (default %(default)s)",
    )
    p.add_argument("--seeds", help="seeds to train each row with, e.g. 0,1 (default: the plan's)")
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.set_defaults(run=_generalise)


def _sweep_command(sub: Subcommands) -> None:
    p = sub.add_parser("sweep", help="equal-budget search of every model's settings, validation")
    _data_arg(p)
    p.add_argument("--config", type=Path, default=Path("configs/sweep.toml"), help="sweep plan")
    p.add_argument(
        "--work-dir", type=Path, help="features and checkpoints (default runs/<dataset>)"
    )
    p.add_argument("--docs", type=Path, default=Path("docs"))
    _jobs_arg(p)
    p.set_defaults(run=_sweep)


def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--work-dir", type=Path, help="features, checkpoints, plan (default runs/<dataset>)"
    )
    p.add_argument(
        "--sweep",
        type=Path,
        default=Path("configs/sweep.toml"),
        help="what tuning searches: base plan and each row's grid (default %(default)s)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=DEFAULT_BUDGET,
        help="training runs per row when tuning, the same for every row (default %(default)s)",
    )
    _jobs_arg(p)


def _jobs(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of runs (1 or more), or auto")
    return int(text)


def _jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jobs",
        type=_jobs,
        help="training runs side by side, each in its own process with a share of the cores "
        "(default auto: one per core on a CPU, up to 8; one on a GPU)",
    )


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="dataset folder (interactions.csv, items.csv, images)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1")


def _config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its annotation."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif choices:
            p.add_argument(flag, choices=choices, default=None)
        else:
            base = (
                next((a for a in typing.get_args(hint) if a is not type(None)), hint)
                if isinstance(hint, types.UnionType)
                else hint
            )
            p.add_argument(
                flag, type=typing.cast(type, base), default=None, help=f"default {f.default}"
            )


if __name__ == "__main__":
    sys.exit(main())
