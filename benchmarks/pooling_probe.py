"""Can a synthetic world tell component attention from a mean? A linear probe says.

Generates the world of the reproduce plan's ``[synthetic]`` table (with the overrides given),
extracts its features as ``make reproduce`` does, and fits a linear classifier (multinomial
logistic regression, L2) of each item's kind on half of the items, once on the mean of its
cell-centred components and once on the mean of its object's cells only (what attention that
found the object would read), on the raw components and on the projected ones ACF is given
(centred, 128 principal directions). It prints the held-out accuracies against chance. When the
mean reads the kind about as well as the object's cells, no pooling can beat a mean in that
world: the object dominates the image and the distractors are noise a linear map averages out.
No user and no split of interactions is involved, so a world can be chosen on this without
looking at any model's test figures.

    .venv/bin/python benchmarks/pooling_probe.py [--config configs/reproduce.toml]
        [--set clutter_min=0.8 --set clutter_max=1.0] [--work runs/probe]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.model.projection import project
from service.offline.data.synthetic import WorldSpec, make_world
from service.offline.evaluation.attention import ON_OBJECT
from service.offline.experiments.plan import load_plan
from service.offline.experiments.reproduce import prepare_with_features
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import feature_projection
from service.runtime import pick_device


def probe_accuracy(x: Tensor, y: Tensor, gen: torch.Generator, *, l2: float = 1e-3) -> float:
    """Held-out accuracy of a linear classifier of ``y`` (M,) from ``x`` (M, C), fitted on a
    random half of the rows and scored on the other half."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = torch.randperm(len(x), generator=gen)
    fit_rows, held_rows = order[: len(x) // 2], order[len(x) // 2 :]
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def loss() -> Tensor:
        opt.zero_grad()
        value = F.cross_entropy(x[fit_rows] @ w + b, y[fit_rows]) + l2 * (w**2).sum()
        value.backward()
        return value

    opt.step(loss)  # type: ignore[arg-type]
    with torch.no_grad():
        return float(((x[held_rows] @ w + b).argmax(1) == y[held_rows]).float().mean())


def _override(spec: WorldSpec, pairs: list[str]) -> WorldSpec:
    types = {f.name: type(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    values = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types:
            raise SystemExit(f"--set {pair}: no world setting {name!r} (known: {sorted(types)})")
        values[name] = types[name](value)
    return dataclasses.replace(spec, **values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/reproduce.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--work", type=Path, help="keep the world and its features here")
    parser.add_argument("--seed", type=int, default=0, help="of the probe's split")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    plan = load_plan(args.config)
    if plan.synthetic is None:
        raise SystemExit(f"{args.config} has no [synthetic] table")
    spec = _override(plan.synthetic.spec, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        world = make_world(root, spec)
        prepared = prepare_with_features(root, root, plan, pick_device(args.device))
        raw = np.asarray(prepared.features, dtype=np.float32)  # (N, K, C), read before cleanup
    inputs = {  # each cell centred on its catalogue mean, as training does
        f"raw {raw.shape[2]}-d components": torch.as_tensor(raw - raw.mean(0)),
        "ACF's inputs (the default projection)": project(
            raw, feature_projection(raw, TrainConfig())
        ),
    }
    on_object = torch.as_tensor(world.object_cover >= ON_OBJECT, dtype=torch.float32)  # (N, K)
    share = on_object / on_object.sum(1, keepdim=True).clamp(min=1)
    y = torch.as_tensor(world.item_kinds)
    print(f"world: {spec}")
    print(f"{len(y)} items of {spec.classes} kinds; chance {1 / spec.classes:.3f}")
    for name, x in inputs.items():
        gen = torch.Generator().manual_seed(args.seed)  # the same split for both poolings
        mean = probe_accuracy(x.mean(1), y, gen)
        gen = torch.Generator().manual_seed(args.seed)
        on = probe_accuracy((share.unsqueeze(-1) * x).sum(1), y, gen)
        print(f"{name}: kind read from the mean {mean:.3f}, from the object's cells {on:.3f}")


if __name__ == "__main__":
    main()
