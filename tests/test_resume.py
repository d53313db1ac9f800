"""Resumable training: a run stopped after any epoch and resumed ends where an unbroken run
ends, in process, from the command line after a SIGKILL, and when `visrec-serve` trains."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.checkpoint import load_checkpoint
from service.offline.bootstrap import first_start_config, prepare_serving
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, fit, prepare, training_state_path
from service.offline.training.train import TrainResult

CPU = torch.device("cpu")
SMALL = TrainConfig(dim=16, attention_dim=16, epochs=4, batch_size=128, lr=1e-2, patience=0)


@pytest.fixture(scope="module")
def prepared(world: World, world_features: tuple[Path, np.ndarray]) -> Prepared:
    return prepare(world.root, world_features[0])


def _same_run(a: TrainResult, b: TrainResult) -> None:
    assert a.best_epoch == b.best_epoch
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.history]
    ours, theirs = a.model.state_dict(), b.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize(
    "changes",
    [{}, {"model": "sasrec", "profile_dropout": 0.2}],  # SASRec: dropout draws from torch's RNG
    ids=["acf", "sasrec"],
)
def test_a_resumed_run_ends_where_an_unbroken_one_does(
    prepared: Prepared, tmp_path: Path, changes: dict
) -> None:
    config = replace(SMALL, **changes)
    unbroken = fit(prepared, config, device=CPU, progress=False)
    state = tmp_path / "run.state.pt"
    first = fit(prepared, replace(config, epochs=2), device=CPU, progress=False, state_path=state)
    assert len(first.history) == 2
    assert torch.load(state, weights_only=True)["epoch"] == 2
    resumed = fit(prepared, config, device=CPU, progress=False, state_path=state, resume=True)
    assert resumed.history[:2] == first.history  # the first two epochs were not run again
    _same_run(resumed, unbroken)


def test_without_resume_a_saved_state_is_ignored(prepared: Prepared, tmp_path: Path) -> None:
    state = tmp_path / "run.state.pt"
    fit(prepared, replace(SMALL, epochs=2), device=CPU, progress=False, state_path=state)
    again = fit(prepared, SMALL, device=CPU, progress=False, state_path=state)
    _same_run(again, fit(prepared, SMALL, device=CPU, progress=False))


def test_resuming_with_other_settings_is_refused_by_name(
    prepared: Prepared, tmp_path: Path
) -> None:
    state = tmp_path / "run.state.pt"
    fit(prepared, replace(SMALL, epochs=1), device=CPU, progress=False, state_path=state)
    with pytest.raises(ValueError, match=r"lr=0\.01 -> 0\.02"):
        fit(
            prepared,
            replace(SMALL, lr=0.02),
            device=CPU,
            progress=False,
            state_path=state,
            resume=True,
        )


def _train_command(world: World, features: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "service.offline.cli", "train", str(world.root),
        "--features", str(features), "--out", str(out), "--epochs", "25", "--patience", "0",
        "--dim", "8", "--attention-dim", "8", "--batch-size", "256", *extra,
    ]  # fmt: skip


def test_a_killed_command_line_run_resumes_to_the_same_checkpoint(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    features = world_features[0]
    reference = tmp_path / "unbroken.pt"
    subprocess.run(_train_command(world, features, reference), env=env, check=True,
                   capture_output=True)  # fmt: skip
    assert not training_state_path(reference).exists()  # a finished run leaves no state

    out = tmp_path / "killed.pt"
    state = training_state_path(out)
    proc = subprocess.Popen(_train_command(world, features, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    stopped_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= stopped_at < 25

    done = subprocess.run(_train_command(world, features, out, "--resume"), env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not state.exists()
    ours, theirs = load_checkpoint(out), load_checkpoint(reference)
    assert len(ours.history) == 25
    assert [h["nDCG@20"] for h in ours.history] == [h["nDCG@20"] for h in theirs.history]
    for name, tensor in ours.state.items():
        assert torch.equal(tensor, theirs.state[name]), name


def test_visrec_serve_resumes_an_interrupted_training(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    run_dir = tmp_path / world.root.resolve().name
    features = run_dir / "features-efficientnet_lite0"
    run_dir.mkdir()
    features.symlink_to(world_features[0])
    checkpoint = run_dir / "acf.pt"
    # what `visrec-serve --epochs 3` leaves behind when it is stopped after two epochs
    prepared = prepare(world.root, features)
    name, config = first_start_config(world.root, run_dir, prepared.dataset.tags)
    assert name == "acf_metadata"  # the plan's first-start row: the world's items have genres
    interrupted = fit(
        prepared,
        replace(config, epochs=2),
        device=CPU,
        progress=False,
        state_path=training_state_path(checkpoint),
    )
    _, _, served = prepare_serving(world.root, tmp_path, CPU, epochs=3)
    assert served == checkpoint and not training_state_path(checkpoint).exists()
    trained = load_checkpoint(checkpoint)
    assert TrainConfig.from_dict(trained.train_config) == replace(config, epochs=3)
    assert trained.config.tags  # what POST /items then reads: the genres
    history = trained.history
    assert len(history) == 3
    assert history[:2] == interrupted.history  # same seconds too: resumed, not retrained
    # once there is a checkpoint, serving does not import the training stack
    script = (
        "import sys, torch; from pathlib import Path; "
        "from service.offline.bootstrap import prepare_serving; "
        f"prepare_serving(Path({str(world.root)!r}), Path({str(tmp_path)!r}), "
        "torch.device('cpu')); "
        "print(sorted(m for m in sys.modules if m.startswith('service.offline.')))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert (
        "service.offline.training.train" not in loaded.stdout
        and "service.offline.data.dataset" in loaded.stdout
    )


def test_visrec_serve_serves_the_row_reproduce_chose_with_the_features_it_was_trained_on(
    world: World, world_features: tuple[Path, np.ndarray], served_work_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / world.root.resolve().name
    run_dir.mkdir()
    shutil.copy(served_work_dir / world.root.resolve().name / "acf.pt", run_dir / "served.pt")
    (run_dir / "features-efficientnet_lite0-genres").symlink_to(world_features[0])
    (run_dir / "features-efficientnet_lite0").mkdir()  # an extraction that never finished
    _, features, served = prepare_serving(world.root, tmp_path, CPU, epochs=1)
    assert served == run_dir / "served.pt"
    assert features == run_dir / "features-efficientnet_lite0-genres"  # as a fitted backbone's
    assert not (run_dir / "acf.pt").exists()  # nothing was trained
