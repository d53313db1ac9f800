"""Training runs side by side (service/offline/training/runner.py): the same models as one after
the other, in the order asked, and a run's error where its result is read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, prepare
from service.offline.training.runner import Runner
from service.runtime import torch_threads

SMALL = TrainConfig(dim=8, attention_dim=8, epochs=3, batch_size=64, lr=1e-2, patience=0)


@pytest.fixture(scope="module")
def prepared(world: World, world_features: tuple[Path, np.ndarray]) -> Prepared:
    return prepare(world.root, world_features[0])


def _configs() -> list[TrainConfig]:
    return [
        replace(SMALL, seed=0, every_position=True, context_blocks=1, user_dropout=0.5),
        replace(SMALL, model="popularity"),  # ends first, asked second
        replace(SMALL, seed=1, every_position=True, context_blocks=1, user_dropout=0.5),
        replace(SMALL, model="sasrec", seed=2),
    ]


def test_runs_side_by_side_train_the_models_one_after_the_other_would(prepared: Prepared) -> None:
    configs = _configs()
    cpu = torch.device("cpu")
    with Runner(cpu, jobs=2, progress=False) as runner:
        futures = [runner.submit(prepared, c) for c in configs]
        apart = [f.result() for f in futures]
    with torch_threads(1), Runner(cpu, progress=False) as runner:  # a worker's one thread
        alone = [runner.submit(prepared, c).result() for c in configs]
    for config, a, b in zip(configs, apart, alone, strict=True):
        assert a.best_epoch == b.best_epoch and len(a.history) == len(b.history)
        assert a.seconds > 0 and b.seconds > 0
        state_a, state_b = a.model.state_dict(), b.model.state_dict()
        assert state_a.keys() == state_b.keys(), config.model
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], msg=f"{config.model} {key}")
        for row_a, row_b in zip(a.history, b.history, strict=True):
            assert row_a["nDCG@20"] == pytest.approx(row_b["nDCG@20"], abs=1e-6)
    # each result is its own run's: the two ACF seeds differ, so a mix-up would show
    assert not torch.equal(
        apart[0].model.item_embedding.weight, apart[2].model.item_embedding.weight
    )


def test_a_runs_error_is_raised_where_its_result_is_read(prepared: Prepared) -> None:
    short = replace(prepared, features=prepared.features[:-1])  # the last item has no image
    with Runner(torch.device("cpu"), jobs=2, progress=False) as runner:
        failing = runner.submit(short, SMALL)
        fine = runner.submit(prepared, replace(SMALL, model="popularity"))
        with pytest.raises(IndexError, match="out of bounds"):
            failing.result()
        assert fine.result().history  # the other run is not lost with it
    alone = Runner(torch.device("cpu"), progress=False).submit(short, SMALL)
    with pytest.raises(IndexError, match="out of bounds"):
        alone.result()


def test_a_runner_needs_at_least_one_job() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Runner(torch.device("cpu"), jobs=0)
