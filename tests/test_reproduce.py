"""``visrec reproduce`` end to end on the synthetic world (small settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.model.checkpoint import load_checkpoint
from service.offline.reproduce import load_plan, reproduce
from service.offline.synthetic import World
from service.offline.train import MODELS

PLAN = """
seed = 3
[features]
backbone = "mobilenet_v2"
[train]
dim = 8
attention_dim = 8
epochs = 3
batch_size = 256
lr = 0.01
[models.bpr_mf]
lr = 0.02
"""


def test_reproduce_writes_both_protocols_for_every_model(world: World, tmp_path: Path) -> None:
    (tmp_path / "plan.toml").write_text(PLAN)
    plan = load_plan(tmp_path / "plan.toml")
    assert plan.configs["bpr_mf"].lr == 0.02
    assert plan.configs["acf"].lr == 0.01
    docs = tmp_path / "docs"
    docs.mkdir()
    reproduce(
        world.root, plan=plan, work_dir=tmp_path / "work", docs_dir=docs, device=torch.device("cpu")
    )
    results = json.loads((docs / "results.json").read_text())
    assert results["dataset"] == world.root.name
    assert set(results["protocols"]) == {"seed", "standard"}
    for protocol in ("seed", "standard"):
        models = results["protocols"][protocol]
        assert set(models) == set(MODELS)
        for metrics in models.values():
            assert {"AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "nDCG@200"} <= set(metrics)
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
        diffs = results["difference_to_acf_95"][protocol]
        assert set(diffs) == set(MODELS) - {"acf"}
        mean, low, high = diffs["popularity"]["R@20"]
        assert low <= mean <= high
        acf, pop = models["acf"]["R@20"], models["popularity"]["R@20"]
        assert mean == pytest.approx(acf - pop)
    page = (docs / "results.md").read_text()
    assert "tutorial ACF, Wikimedia (reference)" in page
    assert "0.80409" in page
    assert (docs / "training.png").stat().st_size > 10_000
    ckpt = load_checkpoint(tmp_path / "work" / "acf.pt")
    assert ckpt.features["backbone"] == "mobilenet_v2"


def test_a_plan_with_an_unknown_model_or_setting_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[models.nope]\nlr = 1\n")
    with pytest.raises(ValueError, match="unknown model"):
        load_plan(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown training setting"):
        load_plan(tmp_path / "b.toml")
