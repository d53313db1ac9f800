"""``visrec tune``: each dataset's settings chosen on its own validation and used by
``visrec reproduce`` for that dataset only; ``visrec generalise``: the same procedure judged
on users and a period that took no part in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.offline.cli import main
from service.offline.data.dataset import (
    Dataset,
    busiest_cut,
    fingerprint,
    leave_last_out,
    load_dataset,
    split_at,
    user_disjoint,
)
from service.offline.data.synthetic import World
from service.offline.experiments.generalise import generalise
from service.offline.experiments.plan import load_plan
from service.offline.experiments.sweep import load_sweep
from service.offline.experiments.tune import plan_for, tune, tuned_plan_path
from service.offline.training.runner import Runner

BASE = """
seeds = [0]
[features]
backbone = "mobilenet_v2"
[train]
dim = 8
attention_dim = 8
epochs = 1
[models.acf]
lr = 0.01
[models.acf_no_visual]
like = "acf"
visual = "none"
[models.transitions]
transition_window = 3
[models.popularity]
"""


@pytest.fixture
def base_plan(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "plan.toml"
    path.write_text(BASE)
    (tmp_path / "configs" / "sweep.toml").write_text(
        'base = "plan.toml"\nbudget = 3\n[space.transitions]\ntransition_window = [1, 9]\n'
        "transition_decay = [0.5, 1.0]\n"
    )
    return path


def test_a_tuned_plan_is_its_base_with_the_settings_it_chose(
    base_plan: Path, tmp_path: Path
) -> None:
    tuned = tmp_path / "runs" / "plan.toml"
    tuned.parent.mkdir()
    tuned.write_text(
        'base = "../configs/plan.toml"\n'
        '[tuned]\ndataset = "d"\nfingerprint = "abc"\nby = "a test"\n'
        "[models.acf]\nlr = 0.5\ncontext_blocks = 1\n"
    )
    plan = load_plan(tuned)
    assert plan.row_names == ["acf", "acf_no_visual", "transitions", "popularity"]
    acf, ablation = plan.row("acf").config, plan.row("acf_no_visual").config
    assert (acf.lr, acf.context_blocks, acf.dim) == (0.5, 1, 8)
    assert (ablation.lr, ablation.context_blocks, ablation.visual) == (0.5, 1, "none")
    assert plan.row("transitions").config.transition_window == 3  # untouched
    assert plan.tuned is not None and plan.tuned_on("abc") and not plan.tuned_on("abd")
    assert "chosen on this dataset's validation by a test" in plan.settings_note("abc")
    assert "not on this dataset's" in plan.settings_note("other")
    assert load_plan(base_plan).tuned is None
    assert "does not say where" in load_plan(base_plan).settings_note("abc")

    tuned.write_text('base = "../configs/plan.toml"\n[models.sasrec]\nlr = 0.5\n')
    with pytest.raises(ValueError, match="lacks"):
        load_plan(tuned)


def test_tune_chooses_on_the_datasets_validation_and_reproduce_finds_its_plan(
    world: World, base_plan: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    path = tune(
        world.root,
        sweep_plan=load_sweep(base_plan.parent / "sweep.toml"),
        work_dir=work,
        runner=Runner(torch.device("cpu"), progress=False),
        budget=2,
    )
    assert path == tuned_plan_path(work)
    saved = json.loads((work / "tune" / "sweep.json").read_text())
    assert saved["budget"] == 2 and len(saved["trials"]) == 2  # transitions only: 2 runs
    best = saved["best"]["transitions"]
    plan = load_plan(path)
    assert plan.tuned_on(fingerprint(world.root))
    transitions = plan.row("transitions").config
    assert transitions.transition_window == best.get("transition_window", 3)
    assert plan.row("acf").config.lr == 0.01  # rows the sweep did not search: as in the base

    # reproduce takes the dataset's own plan; a plan tuned on other data is not taken
    assert plan_for(world.root, work, default=base_plan) == path
    assert plan_for(world.root, tmp_path / "elsewhere", default=base_plan) is None
    base_plan.write_text(
        BASE + f'[tuned]\ndataset = "w"\nfingerprint = "{fingerprint(world.root)}"\nby = "x"\n'
    )
    assert plan_for(world.root, tmp_path / "elsewhere", default=base_plan) == base_plan


def test_the_fingerprint_is_of_the_data_not_of_the_folder(world: World, tmp_path: Path) -> None:
    copy = tmp_path / "renamed"
    copy.mkdir()
    data = (world.root / "interactions.csv").read_bytes()
    (copy / "interactions.csv").write_bytes(data)
    assert fingerprint(copy) == fingerprint(world.root)
    (copy / "interactions.csv").write_bytes(data + data.splitlines(keepends=True)[-1])
    assert fingerprint(copy) != fingerprint(world.root)


def test_visrec_tune_writes_the_plan_it_names(
    world: World, base_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    args = ["tune", str(world.root), "--work-dir", str(work), "--budget", "1", "--device", "cpu"]
    assert main([*args, "--sweep", str(base_plan.parent / "sweep.toml")]) == 0
    assert f"tuned plan: {tuned_plan_path(work)}" in capsys.readouterr().out
    assert load_plan(tuned_plan_path(work)).tuned_on(fingerprint(world.root))


def test_a_user_disjoint_split_tests_users_that_never_validated(world: World) -> None:
    split = leave_last_out(load_dataset(world.root, check_images=False))
    check = user_disjoint(split, np.random.default_rng(0))
    assert not set(check.val_users.tolist()) & set(check.test_users.tolist())
    assert len(check.val_users) + len(check.test_users) == len(split.test_users)  # all users
    assert abs(len(check.val_users) - len(check.test_users)) <= 2
    np.testing.assert_array_equal(check.train_items, split.train_items)


def test_a_split_in_time_trains_on_the_past_and_tests_the_first_step_after() -> None:
    # user 0: 3 before the cut, 2 after; user 1: 1 before (no validation, so no test);
    # user 2: only after
    users = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    items = np.array([1, 2, 3, 4, 5, 1, 2, 3])
    stamps = np.array([5, 1, 2, 20, 30, 3, 25, 40])  # user 0 in time: 2, 3, 1 | 4, 5
    data = Dataset(
        root=Path("."),
        item_ids=np.arange(1, 6),
        image_paths=(),
        titles=(),
        user_ids=np.arange(3),
        users=users,
        items=items,
        timestamps=stamps,
    )
    split = split_at(data, cut=10)
    assert split.train_users.tolist() == [0, 0, 1] and split.train_items.tolist() == [2, 3, 1]
    assert split.val_users.tolist() == [0] and split.val_items.tolist() == [1]
    assert split.test_users.tolist() == [0] and split.test_items.tolist() == [4]
    assert busiest_cut(data, quantiles=(0.1, 0.5)) == int(np.quantile(stamps, 0.5))


def test_generalise_tunes_on_each_split_and_says_whether_the_signs_agree(
    world: World, base_plan: Path, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    # a main page of the same dataset on which transitions is ahead of popularity
    (docs / "results.json").write_text(
        json.dumps(
            {
                "dataset": world.root.name,
                "difference_to_reference_95": {
                    p: {"popularity": {"R@20": [0.1, 0.05, 0.15], "nDCG@20": [0.1, 0.05, 0.15]}}
                    for p in ("standard", "seed")
                },
            }
        )
    )
    checks = generalise(
        world.root,
        sweep_plan=load_sweep(base_plan.parent / "sweep.toml"),
        work_dir=tmp_path / "work",
        docs_dir=docs,
        runner=Runner(torch.device("cpu"), progress=False),
        budget=2,
        rows=("transitions", "popularity"),
    )
    assert [c.name for c in checks] == ["users", "time"]
    for check in checks:
        assert check.test_users > 0 and "transitions" in check.tuned
        iv = check.comparison.diffs["standard"]["popularity"]["R@20"]
        assert iv.low <= iv.mean <= iv.high
    page = (docs / "generalisation.md").read_text()
    assert page.count("on the results page ahead") == 8  # 2 checks x 2 protocols x 2 metrics
    assert "| `transitions` − `popularity` |" in page
    assert "This run: 2 tuning runs per row (the plan's settings and 1 from its grid)" in page
