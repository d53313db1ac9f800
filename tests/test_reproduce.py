"""``visrec reproduce`` and ``visrec sweep`` end to end on the synthetic world (small settings)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.model.backbones import weights_identity
from service.model.checkpoint import load_checkpoint
from service.model.feature_store import BACKBONE_FILE, load_features
from service.offline.data.adapt import AdaptConfig, fit_to
from service.offline.data.synthetic import World, WorldSpec, make_world
from service.offline.experiments import reproduce as reproduce_module
from service.offline.experiments.cold import cold_split
from service.offline.experiments.plan import load_plan
from service.offline.experiments.reproduce import cold_features, prepare_with_features, reproduce
from service.offline.experiments.sweep import Trial, candidates, load_sweep, sweep
from service.offline.training import runner as runner_module
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, prepare
from service.offline.training.runner import Runner

CPU = torch.device("cpu")
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
[models.sasrec]
model = "sasrec"
[models.acf_tutorial]
model = "acf"
base = "tutorial.toml"
[synthetic]
rows = ["acf", "acf_tutorial"]
n_users = 40
n_items = 40
interactions_per_user = 12
run_length = 3.0
new_per_kind = 3
[synthetic.train]
epochs = 1
"""
TUTORIAL = """
[train]
visual = "attention"
loss = "bpr"
every_position = false
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
    assert plan.row_names == [
        "acf",
        "popularity",
        "transitions",
        "bpr_mf",
        "sasrec",
        "acf_tutorial",
    ]
    assert plan.row("bpr_mf").config.lr == 0.02 and plan.row("acf").config.lr == 0.01
    tutorial = plan.row("acf_tutorial").config
    assert (tutorial.model, tutorial.visual, tutorial.dim) == ("acf", "attention", 8)
    assert plan.seeds == (3, 4) and plan.reference == "acf"
    assert plan.synthetic is not None and plan.synthetic.spec.n_items == 40


def test_an_ablation_is_like_its_row_with_one_change(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        "[models.acf]\nlr = 0.02\nentropy_bonus = 0.3\nevery_position = false\n"
        '[models.acf_mean_pool]\nlike = "acf"\ncomponent_pool = "mean"\n'
        '[models.acf_mean_pool_no_visual]\nlike = "acf_mean_pool"\nvisual = "none"\n'
    )
    plan = load_plan(tmp_path / "p.toml")
    deepest = plan.row("acf_mean_pool_no_visual").config
    assert (deepest.model, deepest.lr, deepest.entropy_bonus) == ("acf", 0.02, 0.3)
    assert (deepest.component_pool, deepest.visual) == ("mean", "none")
    assert plan.row("acf").config.component_pool != "mean"
    (tmp_path / "q.toml").write_text('[models.a]\nmodel = "acf"\nlike = "a"\n')
    with pytest.raises(ValueError, match="like itself"):
        load_plan(tmp_path / "q.toml")


def test_a_row_kept_out_of_the_main_table_is_trained_where_the_plan_names_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "p.toml").write_text(
        '[models.acf]\n[models.acf_genres]\nlike = "acf"\nmetadata = true\nmain = false\n'
        '[cold]\nrows = ["acf", "acf_genres"]\n'
    )
    plan = load_plan(tmp_path / "p.toml")
    assert [r.name for r in plan.main_rows] == ["acf"]
    assert plan.row("acf_genres").config.metadata and plan.cold is not None
    assert plan.cold.rows == ("acf", "acf_genres")
    (tmp_path / "q.toml").write_text('[models.acf]\nmain = "no"\n')
    with pytest.raises(ValueError, match="true or false"):
        load_plan(tmp_path / "q.toml")


def test_a_first_start_trains_the_first_row_the_data_can_train(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        'reference = "acf"\nfirst_start = ["acf_titles", "acf"]\n[models.acf]\n'
        '[models.acf_titles]\nlike = "acf"\nmetadata = true\ntitles = true\n'
    )
    plan = load_plan(tmp_path / "p.toml")
    titled = [frozenset({"Comedy", "word:toy"}), frozenset({"word:toy"})]
    assert plan.first_start_row(titled).name == "acf_titles"
    assert plan.first_start_row([frozenset(), frozenset()]).name == "acf"  # nothing to read
    assert load_plan(None).first_start_row(titled).name == "acf"  # no first_start: reference
    (tmp_path / "q.toml").write_text('first_start = ["nope"]\n[models.acf]\n')
    with pytest.raises(ValueError, match="no row 'nope'"):
        load_plan(tmp_path / "q.toml")


def test_reproduce_writes_both_protocols_for_every_row_and_seed(
    world: World, plan_file: Path, tmp_path: Path
) -> None:
    plan = load_plan(plan_file)
    docs = tmp_path / "docs"
    docs.mkdir()
    # side by side, as `visrec reproduce` trains on a machine with more than one core
    with Runner(torch.device("cpu"), jobs=2, progress=False) as runner:
        reproduce(world.root, plan=plan, work_dir=tmp_path / "work", docs_dir=docs, runner=runner)
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
    # New items: ranked by the rows that score items from their images (not the tutorial's)
    assert set(synthetic["new_items_precision_at_20"]) == {"acf"}
    mean, low, high = synthetic["new_items_precision_at_20"]["acf"]
    assert 0 <= low <= mean <= high <= 1
    assert results["new_items_precision_at_20"] == {}  # ml-style data has no new items
    page = (docs / "results.md").read_text()
    for words in ("## What wins", "tutorial ACF, Wikimedia (reference)", "mass on object"):
        assert words in page
    assert not any(row.config.ages for row in plan.rows)
    assert "how long before the profile's newest item" not in page  # said of rows that read ages
    ablations = page[page.index("## The visual half") :].splitlines()
    tutorial = next(line for line in ablations if line.startswith("| acf_tutorial |"))
    assert "new items P@20" in page and tutorial.endswith("| cannot | — |")
    assert (docs / "training.png").stat().st_size > 10_000
    ckpt = load_checkpoint(tmp_path / "work" / "acf.pt")
    assert ckpt.features["backbone"] == "mobilenet_v2" and ckpt.train_config["seed"] in (3, 4)
    # The served row: the servable one (not a baseline) with the best mean validation nDCG@20
    validation: dict[str, list[float]] = {}
    for r in runs:
        validation.setdefault(r["row"], []).append(r["history"][r["best_epoch"] - 1]["nDCG@20"])
    servable = {"acf", "acf_tutorial", "sasrec"}
    assert results["served"] == max(servable, key=lambda row: np.mean(validation[row]))
    served = load_checkpoint(tmp_path / "work" / "served.pt")
    assert served.model == ("sasrec" if results["served"] == "sasrec" else "acf")
    assert served.validation["nDCG@20"] == max(validation[results["served"]])
    assert f"**Served.** `{results['served']}`" in page
    # The page's goal: the ACF row best on validation (not on test) against SASRec
    contest = results["best_acf_against_sasrec_95"]
    assert contest["acf"] == max(("acf", "acf_tutorial"), key=lambda r: np.mean(validation[r]))
    for protocol in ("seed", "standard"):
        rows = results["protocols"][protocol]
        mean, low, high = contest["difference"][protocol]["nDCG@20"]
        assert low <= mean <= high
        assert mean == pytest.approx(rows[contest["acf"]]["nDCG@20"] - rows["sasrec"]["nDCG@20"])
    assert f"**Best ACF variant against SASRec.** `{contest['acf']}`" in page
    assert results["synthetic"]["best_acf_against_sasrec_95"] is None  # no SASRec row there
    # The served run's diversity re-rank, at each setting the page lists
    assert [r["diversity"] for r in results["diversity_standard"]] == [0.0, 0.25, 0.5, 0.75]
    assert "## Diversity (protocol `standard`)" in page
    # The long tail: every test user in exactly one bucket of their target's training count
    tail = results["tail_standard"]
    prepared = prepare(world.root, tmp_path / "work" / "features-mobilenet_v2")
    counts = np.bincount(prepared.split.train_items)[prepared.split.test_items]
    assert sum(b["users"] for b in tail.values()) == len(counts)
    assert tail["≤ 5"]["users"] == int((counts <= 5).sum())
    for bucket in tail.values():
        mean, low, high = bucket["rows"]["popularity"]["R@20"]
        assert 0 <= low <= mean <= high <= 1
        assert set(bucket["difference_to_reference_95"]) == set(plan.row_names) - {"acf"}
    assert "## The long tail (protocol `standard`)" in page


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


def test_a_fitted_backbone_reads_the_features_and_the_cold_protocol_fits_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[features] adapt``: the main protocols' features are read by a backbone fitted to
    the items' genres, kept beside them for the server; the cold protocol's by one fitted on
    the warm items only: a new film's poster and genres are never fitted on."""
    (tmp_path / "p.toml").write_text(
        "[features]\nadapt = 'genres'\n[models.acf]\n[cold]\nrows = ['acf']\nshare = 0.2\n"
    )
    plan = load_plan(tmp_path / "p.toml")
    assert plan.adapt == "genres"
    world = make_world(tmp_path / "world", WorldSpec(n_users=30, n_items=50))
    fitted_on: list[set[int]] = []

    def spy(dataset: Any, split: Any, out: Path, config: AdaptConfig, **kwargs: Any) -> Any:
        fitted_on.append(set(dataset.item_ids.tolist()))
        return fit_to(dataset, split, out, replace(config, epochs=2), **kwargs)  # quicker

    monkeypatch.setattr(reproduce_module, "fit_to", spy)
    work, cpu = tmp_path / "work", torch.device("cpu")
    prepared = prepare_with_features(world.root, work, plan, cpu)
    folder = work / "features-efficientnet_lite0-genres"
    meta = load_features(folder)[1]
    assert meta.weights_id == weights_identity("efficientnet_lite0", weights=folder / BACKBONE_FILE)
    assert meta.weights_id != weights_identity("efficientnet_lite0")
    world_ids = set(prepared.dataset.item_ids.tolist())
    assert fitted_on == [world_ids]  # every item's genres: they are known before any choice

    refit = cold_features(prepared, work, plan, cpu)
    assert refit is not None and plan.cold is not None
    rng = np.random.default_rng(plan.cold.seed)
    split = cold_split(prepared.dataset, rng, share=plan.cold.share)
    cold = refit(split)
    held = set(prepared.dataset.item_ids[np.r_[split.validation_items, split.test_items] - 1])
    assert fitted_on[1] == world_ids - held  # the warm items only
    assert cold.shape == prepared.features.shape
    assert not np.array_equal(cold, prepared.features)


def test_data_without_genres_is_read_by_the_shipped_backbone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan that fits the backbone to genres must still run on data that has none."""
    world = make_world(tmp_path / "world", WorldSpec(n_users=20, n_items=30))
    items = (world.root / "items.csv").read_text().splitlines()
    rows = [line.split(",") for line in items]
    without = [",".join(r[:2] + r[3:]) for r in rows]  # item_id,title,genres,image: drop genres
    (world.root / "items.csv").write_text("\n".join(without) + "\n")
    (tmp_path / "p.toml").write_text("[features]\nadapt = 'genres'\n[models.acf]\n")
    work = tmp_path / "work"
    with caplog.at_level("WARNING"):
        prepared = prepare_with_features(world.root, work, load_plan(tmp_path / "p.toml"), CPU)
    assert "no item has genres" in caplog.text
    assert not any(prepared.dataset.genres)
    assert [p.name for p in work.iterdir()] == ["features-efficientnet_lite0"]
    meta = load_features(work / "features-efficientnet_lite0")[1]
    assert meta.weights_id == weights_identity("efficientnet_lite0")  # as shipped


def test_a_plan_fits_a_backbone_to_a_known_target_of_the_backbone_it_knows(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.toml").write_text("[features]\nadapt = 'colour'\n[models.acf]\n")
    with pytest.raises(ValueError, match="adapt must be one of"):
        load_plan(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(
        "[features]\nbackbone = 'mobilenet_v2'\nadapt = 'genres'\n[models.acf]\n"
    )
    with pytest.raises(ValueError, match="fits efficientnet_lite0's last stage"):
        load_plan(tmp_path / "b.toml")


def test_sweep_candidates_start_with_the_plan_and_never_repeat() -> None:
    space = {"lr": [1, 2, 3], "dim": [4, 5]}
    picks = candidates(space, 5, np.random.default_rng(0))
    assert picks[0] == {} and len(picks) == 5
    assert len({tuple(sorted(p.items())) for p in picks[1:]}) == 4
    assert len(candidates(space, 50, np.random.default_rng(0))) == 7  # the whole grid, once
    # The plan's own point is run first, as the plan, and not drawn again.
    again = candidates(space, 50, np.random.default_rng(0), planned={"lr": 2, "dim": 5})
    assert len(again) == 6 and {"lr": 2, "dim": 5} not in again


def _sweep(world: World, tmp_path: Path, jobs: int = 1) -> list[Trial]:
    with Runner(torch.device("cpu"), jobs=jobs, progress=False) as runner:
        return sweep(
            world.root,
            plan=load_sweep(tmp_path / "sweep.toml"),
            work_dir=tmp_path / "work",
            docs_dir=tmp_path / "docs",
            runner=runner,
        )


@pytest.fixture
def sweep_file(plan_file: Path) -> Path:
    path = plan_file.parent / "sweep.toml"
    path.write_text(
        'base = "plan.toml"\nbudget = 2\n[space.transitions]\ntransition_window = [1, 9]\n'
        "[compare.acf]\nevery_position = [false]\n"
    )
    return path


def test_sweep_reads_validation_only_and_writes_its_page(
    world: World, sweep_file: Path, tmp_path: Path
) -> None:
    trials = _sweep(world, tmp_path, jobs=2)  # side by side, each written as it ends
    assert [(t.row, t.kind) for t in trials] == [
        ("transitions", "search"),
        ("transitions", "search"),
        ("acf", "compare"),
    ]
    assert trials[1].changes["transition_window"] in (1, 9)
    docs = tmp_path / "docs"
    saved = json.loads((docs / "sweep.json").read_text())
    assert len(saved["trials"]) == 3 and "transitions" in saved["best"]
    assert "[models.transitions]" in (docs / "sweep.md").read_text()


def test_a_sweep_resumes_and_reruns_only_what_changed(
    world: World, plan_file: Path, sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _sweep(world, tmp_path)
    trained: list[str] = []
    real_fit = runner_module.fit

    def counting_fit(prepared: Prepared, config: TrainConfig, **kwargs: Any) -> Any:
        trained.append(config.model)
        return real_fit(prepared, config, **kwargs)

    monkeypatch.setattr(runner_module, "fit", counting_fit)
    assert [t.seconds for t in _sweep(world, tmp_path)] == [t.seconds for t in first]
    assert trained == []

    # A changed setting of one row in the plan makes that row's trials stale, and only those.
    plan_file.write_text(
        plan_file.read_text().replace(
            "[models.transitions]", "[models.transitions]\ntransition_decay = 0.5", 1
        )
    )
    _sweep(world, tmp_path)
    assert trained == ["transitions", "transitions"]


def test_a_stopped_resume_keeps_the_trials_it_had_not_reached(
    world: World, sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sweep(world, tmp_path)
    sweep_file.write_text(sweep_file.read_text().replace("[1, 9]", "[2]"))  # a draw not run yet

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "fit", stop)
    with pytest.raises(KeyboardInterrupt):
        _sweep(world, tmp_path)  # stops at the first transitions draw it has not run
    saved = json.loads((tmp_path / "docs" / "sweep.json").read_text())["trials"]
    assert ("acf", "compare") in {(t["row"], t["kind"]) for t in saved}
