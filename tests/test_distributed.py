"""Data-parallel training: two gloo processes under torchrun take the steps one process takes
on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.checkpoint import Checkpoint, load_checkpoint
from service.offline.data.synthetic import World

# Two processes sum a batch's gradients in another order than one process does: after 34 Adam
# steps the weights agreed to 1e-6 (measured: at most 8.3e-7 on weights of scale ~1); with the
# context blocks and every-position batches, to 3.3e-5 (one weight of 1,920 of a user embedding,
# the rest within 1e-5): Adam scales a gradient that rounding tips about zero up to a step.
ATOL, RTOL = 1e-4, 1e-4
# The biases of the two attention scorers shift every logit of a softmax alike: their gradient is
# zero but for rounding, which Adam scales up to whole steps, so they wander and mean nothing.
SHIFT_ONLY = {"comp_out.bias", "item_out.bias"}


def _meaningful(name: str, weights: torch.Tensor) -> torch.Tensor:
    """The weights without those that only shift a softmax's logits alike: the key bias of
    self-attention (the middle third of ``in_proj_bias``) is one of them too."""
    if name.endswith("attention.in_proj_bias"):
        d = len(weights) // 3
        return torch.cat([weights[:d], weights[2 * d :]])
    return weights


def _train(world: World, features: Path, out: Path, processes: int, *extra: str) -> Checkpoint:
    run = ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"]
    command = [
        sys.executable, "-m", *(run if processes > 1 else []), "service.offline.cli",
        "train", str(world.root), "--features", str(features), "--out", str(out),
        "--epochs", "2", "--patience", "0", "--batch-size", "128",
        "--dim", "16", "--attention-dim", "16", "--lr", "0.01",
        "--context-blocks", "2", "--every-position",  # rows of positives of unequal counts
        "--dropout", "0",  # each process draws its own dropout masks: no two runs would agree
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_checkpoint(out)


def test_two_processes_take_the_steps_of_one(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    one = _train(world, world_features[0], tmp_path / "one.pt", 1)
    two = _train(world, world_features[0], tmp_path / "two.pt", 2)
    assert one.state.keys() == two.state.keys()
    compared = [name for name in one.state if name not in SHIFT_ONLY]
    for name in compared:
        torch.testing.assert_close(
            _meaningful(name, two.state[name]),
            _meaningful(name, one.state[name]),
            atol=ATOL,
            rtol=RTOL,
        )
    untrained = _train(world, world_features[0], tmp_path / "zero.pt", 1, "--lr", "1e-9")
    moved = [
        name
        for name in compared
        if not torch.allclose(untrained.state[name], one.state[name], atol=ATOL, rtol=RTOL)
    ]
    assert len(moved) == len(compared), "some weights did not train: they tested nothing"
    assert [h["nDCG@20"] for h in two.history] == pytest.approx(
        [h["nDCG@20"] for h in one.history], abs=0.005
    )
