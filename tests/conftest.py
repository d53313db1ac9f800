"""Shared fixtures: the real MovieLens-100K folder and a small synthetic visual world."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.feature_store import load_features
from service.offline.data.dataset import load_dataset
from service.offline.data.features import extract_features
from service.offline.data.synthetic import World, WorldSpec, make_world

pytest_plugins = ["tests.watchdog"]

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml100k"
# Apps built by tests run without API keys unless a test configures them (tests/test_security.py).
os.environ.setdefault("VISREC_ENVIRONMENT", "development")


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # Small tensors: one thread avoids oversubscription when the machine is busy.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ml100k() -> Path:
    assert (ML100K / "interactions.csv").is_file(), f"the real dataset is expected at {ML100K}"
    return ML100K


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("world"), WorldSpec(n_users=120, n_items=200))


@pytest.fixture(scope="session")
def world_features(world: World) -> tuple[Path, np.ndarray]:
    """Real EfficientNet-Lite0 features of the world's images (a few seconds)."""
    data = load_dataset(world.root)
    out = world.root / "features"
    extract_features(data.item_ids.tolist(), list(data.image_paths), out, progress=False)
    features, _ = load_features(out)
    return out, features


@pytest.fixture(scope="session")
def served_work_dir(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A ``visrec-serve --work-dir`` holding the world's features and a small trained
    checkpoint, so that servers started on the world are up in seconds."""
    from dataclasses import replace

    from service.model.checkpoint import save_checkpoint
    from service.offline.training.config import TrainConfig
    from service.offline.training.pipeline import fit, prepare, to_checkpoint

    work = tmp_path_factory.mktemp("served")
    run_dir = work / world.root.resolve().name
    run_dir.mkdir()
    features = run_dir / "features-efficientnet_lite0"
    features.symlink_to(world_features[0])
    prepared = prepare(world.root, features)
    config = replace(TrainConfig(), dim=16, attention_dim=16, epochs=2)
    result = fit(prepared, config, device=torch.device("cpu"), progress=False)
    save_checkpoint(run_dir / "acf.pt", to_checkpoint(prepared, result, config))
    return work
