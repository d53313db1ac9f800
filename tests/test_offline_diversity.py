"""The diversity re-rank measured offline (service/offline/evaluation/diversity.py): at 0 it is
the protocol's own ranking, and more of it makes lists less alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.offline.data.synthetic import World
from service.offline.evaluation.diversity import diversity_rows
from service.offline.evaluation.evaluate import evaluate, holdout_task
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare

CPU = torch.device("cpu")


def test_the_rerank_at_zero_is_the_protocols_ranking_and_more_of_it_lists_less_alike_items(
    world: World, world_features: tuple[Path, np.ndarray]
) -> None:
    prepared = prepare(world.root, world_features[0])
    config = replace(TrainConfig(dim=16, attention_dim=16, epochs=3, lr=1e-2), patience=0)
    model = fit(prepared, config, device=CPU, progress=False).model
    task = holdout_task(prepared.split, "standard")
    rows = diversity_rows(model, task, device=CPU, rng=np.random.default_rng(0), n_resamples=50)
    assert [r.diversity for r in rows] == [0.0, 0.25, 0.5, 0.75]
    table = evaluate(model, task, device=CPU)
    one_user = 1 / len(task.users)  # a tie at the target may count once either way
    assert rows[0].recall == pytest.approx(float(table["R@20"].mean()), abs=one_user)
    assert rows[0].ndcg == pytest.approx(float(table["nDCG@20"].mean()), abs=one_user)
    assert rows[0].ndcg_change.mean == 0.0
    assert rows[-1].ils < rows[0].ils  # the re-rank trades score for variety
    assert all(r.ndcg_change.low <= r.ndcg_change.mean <= r.ndcg_change.high for r in rows)
