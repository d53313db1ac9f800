"""``visrec reproduce`` and ``visrec sweep`` end to end on the synthetic world (small settings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.checkpoint import load_checkpoint
from service.offline.plan import load_plan
from service.offline.reproduce import reproduce
from service.offline.sweep import candidates, load_sweep, sweep
from service.offline.synthetic import World

PLAN = """
seeds = [3, 4]
bootstrap_seed = 3
n_resamples = 200
[features]
backbone = "mobilenet_v2"
[train]
dim = 8
attention_dim = 8
epochs = 2
batch_size = 256
lr = 0.01
[models.acf]
[models.popularity]
[models.transitions]
[models.bpr_mf]
lr = 0.02
loss = "bpr"
[models.acf_tutorial]
model = "acf"
base = "tutorial.toml"
[synthetic]
rows = ["acf", "acf_tutorial"]
n_users = 40
n_items = 40
interactions_per_user = 12
run_length = 3.0
[synthetic.train]
epochs = 1
"""
TUTORIAL = """
[train]
visual = "attention"
loss = "bpr"
feature_rank = 0
centre_components = false
"""


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    (tmp_path / "plan.toml").write_text(PLAN)
    (tmp_path / "tutorial.toml").write_text(TUTORIAL)
    return tmp_path / "plan.toml"


def test_plans_layer_defaults_shared_base_and_row_settings(plan_file: Path) -> None:
    plan = load_plan(plan_file)
    assert plan.row_names == ["acf", "popularity", "transitions", "bpr_mf", "acf_tutorial"]
    assert plan.row("bpr_mf").config.lr == 0.02 and plan.row("acf").config.lr == 0.01
    tutorial = plan.row("acf_tutorial").config
    assert (tutorial.model, tutorial.visual, tutorial.dim) == ("acf", "attention", 8)
    assert plan.seeds == (3, 4) and plan.reference == "acf"
    assert plan.synthetic is not None and plan.synthetic.spec.n_items == 40


def test_reproduce_writes_both_protocols_for_every_row_and_seed(
    world: World, plan_file: Path, tmp_path: Path
) -> None:
    plan = load_plan(plan_file)
    docs = tmp_path / "docs"
    docs.mkdir()
    reproduce(
        world.root,
        plan=plan,
        work_dir=tmp_path / "work",
        docs_dir=docs,
        device=torch.device("cpu"),
        progress=False,
    )
    results = json.loads((docs / "results.json").read_text())
    assert results["dataset"] == world.root.name and results["seeds"] == [3, 4]
    for protocol in ("seed", "standard"):
        rows = results["protocols"][protocol]
        assert set(rows) == set(plan.row_names)
        for metrics in rows.values():
            assert {"AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "nDCG@200"} <= set(metrics)
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
        diffs = results["difference_to_reference_95"][protocol]
        assert set(diffs) == set(plan.row_names) - {"acf"}
        mean, low, high = diffs["popularity"]["R@20"]
        assert low <= mean <= high
        assert mean == pytest.approx(rows["acf"]["R@20"] - rows["popularity"]["R@20"])
        assert results["spread_over_seeds"][protocol]["popularity"]["R@20"] == 0.0  # fitted once
    runs = results["runs"]
    trained = [r for r in runs if r["row"] == "acf"]
    assert [r["seed"] for r in trained] == [3, 4] and all(r["best_epoch"] >= 1 for r in trained)
    first, second = (r["history"][0]["loss"] for r in trained)
    assert first != second  # the seeds changed something
    heatmaps = results["heatmaps"]["acf"]
    assert len(heatmaps) == 2 and 0 <= heatmaps[0]["strongest_in_corner"] <= 1
    synthetic = results["synthetic"]
    assert set(synthetic["protocols"]["standard"]) == {"acf", "acf_tutorial"}
    assert "object_mass" in synthetic["heatmaps"]["acf"][0]
    page = (docs / "results.md").read_text()
    for words in ("## What wins", "tutorial ACF, Wikimedia (reference)", "mass on object"):
        assert words in page
    assert (docs / "training.png").stat().st_size > 10_000
    ckpt = load_checkpoint(tmp_path / "work" / "acf.pt")
    assert ckpt.features["backbone"] == "mobilenet_v2" and ckpt.train_config["seed"] in (3, 4)


def test_a_plan_with_an_unknown_model_or_setting_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[models.nope]\nlr = 1\n")
    with pytest.raises(ValueError, match="unknown model"):
        load_plan(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown training setting"):
        load_plan(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("reference = 'x'\n[models.acf]\n")
    with pytest.raises(ValueError, match="no row 'x'"):
        load_plan(tmp_path / "c.toml")


def test_sweep_candidates_start_with_the_plan_and_never_repeat() -> None:
    space = {"lr": [1, 2, 3], "dim": [4, 5]}
    picks = candidates(space, 5, np.random.default_rng(0))
    assert picks[0] == {} and len(picks) == 5
    assert len({tuple(sorted(p.items())) for p in picks[1:]}) == 4
    assert len(candidates(space, 50, np.random.default_rng(0))) == 7  # the whole grid, once


def test_sweep_reads_validation_only_and_writes_its_page(
    world: World, plan_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "sweep.toml").write_text(
        'base = "plan.toml"\nbudget = 2\n[space.transitions]\ntransition_window = [1, 9]\n'
        '[compare.acf]\nloss = ["bpr"]\n'
    )
    docs = tmp_path / "docs"
    trials = sweep(
        world.root,
        plan=load_sweep(tmp_path / "sweep.toml"),
        work_dir=tmp_path / "work",
        docs_dir=docs,
        device=torch.device("cpu"),
    )
    assert [(t.row, t.kind) for t in trials] == [
        ("transitions", "search"),
        ("transitions", "search"),
        ("acf", "compare"),
    ]
    assert trials[1].changes["transition_window"] in (1, 9)
    saved = json.loads((docs / "sweep.json").read_text())
    assert len(saved["trials"]) == 3 and "transitions" in saved["best"]
    assert "[models.transitions]" in (docs / "sweep.md").read_text()
