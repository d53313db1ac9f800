"""``visrec publish``, ``rollback`` and ``experiment``: which versions of the model registry
serve (:mod:`service.registry`), and what users did with each (:mod:`service.abtest`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.abtest import report, stored_totals
from service.config import RegistrySettings
from service.model.tables import write_serving_tables
from service.registry import Registry, RegistryError

Subcommands = argparse._SubParsersAction  # what add_subparsers returns


def registry_args(p: argparse.ArgumentParser) -> None:
    env = RegistrySettings()
    p.add_argument(
        "--registry",
        type=Path,
        default=env.registry,
        help="the registry's folder (default: $VISREC_REGISTRY)",
    )
    p.add_argument(
        "--redis-url",
        default=env.redis_url,
        help="the Redis naming the current version (default: $VISREC_REDIS_URL)",
    )
    p.add_argument(
        "--redis-prefix",
        default=env.redis_prefix,
        help="its keys' prefix (default: $VISREC_REDIS_PREFIX, else visrec)",
    )


def _registry(args: argparse.Namespace) -> Registry:
    if args.registry is None or not args.redis_url:
        raise ValueError(
            "say where the registry is: --registry DIR and --redis-url URL (or "
            "VISREC_REGISTRY and VISREC_REDIS_URL, as the service reads them)"
        )
    return Registry(args.registry, args.redis_url, args.redis_prefix)


def publish_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "publish", help="add a checkpoint and its features to the model registry, as current"
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--features", type=Path, required=True, help="the features it was trained on")
    registry_args(p)
    p.set_defaults(run=_publish)


def _publish(args: argparse.Namespace) -> None:
    registry = _registry(args)
    version = registry.store(args.checkpoint, args.features)
    write_serving_tables(*registry.files(version))  # before it serves: replicas only read them
    current = registry.make_current(version)
    print(
        f"published {current.version} (generation {current.generation}): every replica "
        "following the registry loads it now"
    )


def rollback_command(sub: Subcommands) -> None:
    p = sub.add_parser("rollback", help="make the registry's previous version current again")
    registry_args(p)
    p.set_defaults(run=_rollback)


def _rollback(args: argparse.Namespace) -> None:
    current = _registry(args).rollback()
    print(f"rolled back to {current.version} (generation {current.generation})")


def experiment_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "experiment", help="serve registry versions side by side to shares of the users (A/B)"
    )
    actions = p.add_subparsers(required=True, metavar="action")
    start = actions.add_parser("start", help="start an experiment (replacing a running one)")
    start.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=VERSION",
        help="an arm and the registry version it serves (repeat; the first is the control)",
    )
    start.add_argument(
        "--split", required=True, help="percent of the users per arm, in order: e.g. 90/10"
    )
    start.set_defaults(run=_start)
    for name, run, what in (
        ("status", _status, "the running experiment"),
        ("stop", _stop, "stop it: every user gets the current version again"),
        ("report", _report, "CTR per arm with intervals, and which arm is ahead"),
    ):
        action = actions.add_parser(name, help=what)
        registry_args(action)
        action.set_defaults(run=run)
    promote = actions.add_parser("promote", help="make an arm's version current, then stop")
    promote.add_argument("arm")
    promote.set_defaults(run=_promote)
    for action in (start, promote):
        registry_args(action)


def _start(args: argparse.Namespace) -> None:
    arms = [tuple(a.split("=", 1)) for a in args.arm]
    if any(len(a) != 2 for a in arms):
        raise RegistryError(f"an arm is NAME=VERSION: got {', '.join(args.arm)}")
    try:
        split = [int(s) for s in args.split.split("/")]
    except ValueError as err:
        raise RegistryError(f"a split is percents like 90/10: got {args.split!r}") from err
    experiment = _registry(args).start_experiment(arms, split)
    print(f"experiment {experiment.id} started: every replica routes users to its arms now")


def _status(args: argparse.Namespace) -> None:
    registry = _registry(args)
    running, current = registry.experiment(), registry.current()
    print(f"current version: {current.version if current else 'none'}")
    if running is None:
        print("no experiment runs")
        return
    for (arm, version), share in zip(running.arms, running.split, strict=True):
        print(f"experiment {running.id}: arm {arm} = {version}, {share}% of the users")


def _stop(args: argparse.Namespace) -> None:
    stopped = _registry(args).stop_experiment()
    print(f"experiment {stopped.id} stopped: every user gets the current version again")


def _promote(args: argparse.Namespace) -> None:
    current = _registry(args).promote(args.arm)
    print(f"{args.arm}'s version {current.version} is current; the experiment stopped")


def _report(args: argparse.Namespace) -> None:
    registry = _registry(args)
    running = registry.experiment()
    if running is None:
        raise RegistryError("no experiment runs (a stopped one's counts stay in GET /feedback)")
    for line in report(running, stored_totals(args.redis_url, args.redis_prefix)):
        print(line)
