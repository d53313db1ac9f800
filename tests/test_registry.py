"""The model registry: immutable versions in a folder, the current one in Redis, and replicas
(real `visrec-serve` processes) that follow every publish and rollback under load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from harness.processes import SERVE, call, free_port, wait_for
from harness.redis_servers import REDIS, redis_prefix
from service.model.checkpoint import save_checkpoint
from service.offline.cli import main as visrec
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.registry import Registry, RegistryError

FAILURES = (OSError, json.JSONDecodeError)


@dataclass(frozen=True)
class Models:
    a: Path
    b: Path
    features: Path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def models(world: World, served_work_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Models:
    run_dir = served_work_dir / world.root.resolve().name
    features = run_dir / "features-efficientnet_lite0"
    prepared = prepare(world.root, features)
    config = replace(TrainConfig(), dim=16, attention_dim=16, epochs=2, seed=1)
    b = tmp_path_factory.mktemp("model-b") / "acf.pt"
    save_checkpoint(
        b,
        to_checkpoint(
            prepared, fit(prepared, config, device=torch.device("cpu"), progress=False), config
        ),
    )
    return Models(run_dir / "acf.pt", b, features)


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix("registry") as name:
        yield name


def test_versions_are_immutable_and_rollback_goes_back(
    models: Models, tmp_path: Path, prefix: str
) -> None:
    registry = Registry(tmp_path / "registry", REDIS, prefix)
    assert registry.current() is None
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    a = registry.publish(models.a, models.features)
    assert a.version == _digest(models.a) and a.generation == 1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    b = registry.publish(models.b, models.features)
    assert (b.version, b.generation) == (_digest(models.b), 2)
    assert registry.versions() == sorted([a.version, b.version])
    checkpoint, features = registry.files(a.version)
    assert checkpoint.read_bytes() == models.a.read_bytes()
    assert (features / "features.npy").read_bytes() == (
        models.features / "features.npy"
    ).read_bytes()
    back = registry.rollback()
    assert (back.version, back.generation) == (a.version, 3) and registry.current() == back
    again = registry.publish(models.a, models.features)  # the same bytes: the same version
    assert again.version == a.version and again.generation == 4
    with pytest.raises(RegistryError, match="no version"):
        registry.make_current("0" * 12)


def test_the_command_line_publishes_and_rolls_back(
    models: Models, tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--registry", str(tmp_path / "reg"), "--redis-url", REDIS, "--redis-prefix", prefix]
    features = tmp_path / "features"  # with another checkpoint's tables, not to be copied
    shutil.copytree(models.features, features, ignore=shutil.ignore_patterns("serving"))
    (features / "serving" / "0123456789ab").mkdir(parents=True)
    assert visrec(["publish", str(models.a), "--features", str(features), *where]) == 0
    assert visrec(["publish", str(models.b), "--features", str(features), *where]) == 0
    assert visrec(["rollback", *where]) == 0
    out = capsys.readouterr().out
    assert f"published {_digest(models.b)} (generation 2)" in out
    assert f"rolled back to {_digest(models.a)} (generation 3)" in out
    for model in (models.a, models.b):  # each version went out with its own serving tables
        tables = tmp_path / "reg" / _digest(model) / "features" / "serving"
        assert [p.name for p in tables.iterdir()] == [_digest(model)]
        assert (tables / _digest(model) / "tables.json").is_file()
    assert visrec(["publish", str(models.a), "--features", str(models.features)]) == 2  # where?


def _ready(url: str) -> dict:
    return call(f"{url}/readyz")


def test_every_replica_follows_a_publish_and_a_rollback_under_load(
    world: World, served_work_dir: Path, models: Models, tmp_path: Path, prefix: str
) -> None:
    registry = Registry(tmp_path / "registry", REDIS, prefix)
    registry.publish(models.a, models.features)
    env = {
        **os.environ,
        "VISREC_REDIS_URL": REDIS,
        "VISREC_REDIS_PREFIX": prefix,
        "VISREC_REGISTRY": str(registry.root),
        "VISREC_ENVIRONMENT": "development",
        "VISREC_RATE_LIMIT_PER_S": "0",
    }
    ports = [free_port() for _ in range(3)]
    command = [SERVE, str(world.root), "--work-dir", str(served_work_dir)]
    procs = [subprocess.Popen([*command, "--port", str(p)], env=env) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    # The versions each load thread saw, in order: a thread's requests are sequential, so its
    # list shows what one client of one replica saw (two threads sharing a list would interleave).
    seen: list[tuple[str, list[str]]] = [(u, []) for u in urls for _ in range(2)]
    failures: list[str] = []
    stop = threading.Event()
    try:
        for url in urls:
            wait_for(f"{url}/readyz", procs)

        def load(url: str, versions: list[str]) -> None:
            while not stop.is_set():
                try:
                    version = call(f"{url}/recommend/3?k=10")["model_version"][-12:]
                    if not versions or versions[-1] != version:
                        versions.append(version)
                except FAILURES as err:
                    failures.append(repr(err))

        threads = [threading.Thread(target=load, args=pair) for pair in seen]
        for t in threads:
            t.start()

        def all_serve(checkpoint: Path) -> float:
            started = time.monotonic()
            while time.monotonic() - started < 30:
                if all(_ready(u)["model_version"].endswith(_digest(checkpoint)) for u in urls):
                    return time.monotonic() - started
                time.sleep(0.1)
            raise AssertionError(f"not every replica serves {checkpoint} after 30 s")

        assert all_serve(models.a) < 1  # they started on the current version
        registry.publish(models.b, models.features)
        to_b = all_serve(models.b)
        registry.rollback()
        to_a = all_serve(models.a)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        print(
            f"every replica on the new version {to_b:.1f} s after publish, "
            f"{to_a:.1f} s after rollback"
        )
        assert to_b < 10 and to_a < 10
        assert failures == []
        a, b = _digest(models.a), _digest(models.b)
        for url, versions in seen:  # A, then B, then A again: never back in between
            assert versions == [a, b, a], (url, versions)
    finally:
        stop.set()
        for p in procs:
            p.kill()
            p.wait()


def test_with_a_current_version_visrec_serve_builds_nothing(
    world: World, models: Models, tmp_path: Path, prefix: str
) -> None:
    registry = Registry(tmp_path / "registry", REDIS, prefix)
    registry.publish(models.b, models.features)
    empty = tmp_path / "work"
    env = {
        **os.environ,
        "VISREC_REDIS_URL": REDIS,
        "VISREC_REDIS_PREFIX": prefix,
        "VISREC_REGISTRY": str(registry.root),
        "VISREC_ENVIRONMENT": "development",
    }
    port = free_port()
    command = [SERVE, str(world.root), "--work-dir", str(empty), "--port", str(port)]
    proc = subprocess.Popen(command, env=env)
    try:
        ready = wait_for(f"http://127.0.0.1:{port}/readyz", [proc], timeout_s=60)
        assert ready["model_version"].endswith(_digest(models.b))
        assert not empty.exists()  # no features extracted, nothing trained
    finally:
        proc.kill()
        proc.wait()
