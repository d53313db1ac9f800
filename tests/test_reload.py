"""Model updates while serving: POST /admin/reload on the real app (lifespan running)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import service.engine as engine_module
from service.api.app import create_app
from service.api.state import State
from service.config import Settings
from service.engine import ModelSlot, Source, load_engine, reload_on_hangup
from service.model.checkpoint import load_checkpoint, save_checkpoint
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.recommender import Query

CONFIG = TrainConfig(dim=8, attention_dim=8, epochs=2, batch_size=256, lr=1e-2)
WRITER = "w-0123456789abcdefghijkl"
ADMIN = "adm-ABCDEFGHIJKLMNOPQRSTUV"


@dataclasses.dataclass(frozen=True)
class Files:
    a: Path  # two checkpoints for the same features, trained with other seeds
    b: Path
    features: Path
    profiles: dict[str, list[int]]


@pytest.fixture(scope="module")
def files(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Files:
    prepared = prepare(world.root, world_features[0])
    out = tmp_path_factory.mktemp("reload")
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        config = dataclasses.replace(CONFIG, seed=seed)
        result = fit(prepared, config, device=torch.device("cpu"), progress=False)
        save_checkpoint(out / name, to_checkpoint(prepared, result, config))
    profiles = histories(load_dataset(world.root))
    return Files(out / "a.pt", out / "b.pt", world_features[0], profiles)


def serving(files: Files, tmp_path: Path, **settings: object) -> TestClient:
    """A client of an app serving a copy of checkpoint ``a`` (so a test may overwrite it)."""
    ckpt = tmp_path / "serving.pt"
    shutil.copy(files.a, ckpt)
    base = {
        "checkpoint": ckpt,
        "features": files.features,
        "device": "cpu",
        "model_dirs": str(files.a.parent),  # where the other checkpoints are
    }
    app = create_app(Settings(**{**base, **settings}), profiles=files.profiles)  # type: ignore[arg-type]
    return TestClient(app)


@pytest.fixture
def client(files: Files, tmp_path: Path) -> Iterator[TestClient]:
    with serving(files, tmp_path) as c:
        yield c


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def versions(client: TestClient) -> set[str]:
    """The model version of each kind of answer."""
    rec = client.get("/recommend/3", params={"k": 5}).json()
    anonymous = client.post("/recommend", json={"history": [1, 2, 3]}).json()
    why = client.get("/explain/3", params={"item_id": rec["items"][0]["item_id"]}).json()
    ready = client.get("/readyz").json()
    return {rec["model_version"], anonymous["model_version"], why["model_version"]} | {
        ready["model_version"]
    }


def test_checkpoints_of_the_same_code_have_distinct_versions(
    client: TestClient, files: Files
) -> None:
    (version,) = versions(client)
    assert version.endswith(f"/{digest(files.a)}")
    assert load_checkpoint(files.a).code_version == load_checkpoint(files.b).code_version
    assert digest(files.a) != digest(files.b)


def test_reload_swaps_the_model_in_every_answer(client: TestClient, files: Files) -> None:
    (old,) = versions(client)
    before = client.get("/recommend/3", params={"k": 10}).json()["items"]
    r = client.post("/admin/reload", json={"checkpoint": str(files.b)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["previous_version"] == old
    assert body["model_version"].endswith(f"/{digest(files.b)}")
    assert body["checkpoint"] == str(files.b)
    assert versions(client) == {body["model_version"]}
    after = client.get("/recommend/3", params={"k": 10}).json()["items"]
    assert after != before  # other weights, other scores: the new model answers


def test_reload_without_a_body_reads_the_serving_files_again(
    client: TestClient, files: Files
) -> None:
    (old,) = versions(client)
    unchanged = client.post("/admin/reload")
    assert unchanged.status_code == 200
    assert unchanged.json()["model_version"] == old  # same bytes, same version
    serving_file = Path(unchanged.json()["checkpoint"])
    shutil.copy(files.b, serving_file)  # a new checkpoint dropped in place
    r = client.post("/admin/reload")
    assert r.status_code == 200
    assert r.json()["model_version"].endswith(f"/{digest(files.b)}")
    assert versions(client) == {r.json()["model_version"]}


MakeFile = Callable[[Path, Path], Path]  # (a good checkpoint, a folder) -> the file to load


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a, tmp: tmp / "missing.pt", "does not exist"),
        (lambda a, tmp: _write(tmp / "junk.pt", b"not a checkpoint"), "not a readable checkpoint"),
        (lambda a, tmp: _other_features(a, tmp / "other.pt"), "features do not match"),
        (lambda a, tmp: _long_profiles(a, tmp / "long.pt"), "the profile store keeps 9"),
    ],
    ids=["missing", "garbage", "other-features", "longer-profiles-than-stored"],
)
def test_a_bad_checkpoint_leaves_the_old_model_serving(
    client: TestClient, files: Files, tmp_path: Path, make: MakeFile, reason: str
) -> None:
    (old,) = versions(client)
    before = client.get("/recommend/3", params={"k": 10}).json()
    before.pop("request_id")  # every answer has its own
    path = make(files.a, tmp_path)
    r = client.post("/admin/reload", json={"checkpoint": str(path)})
    assert r.status_code == 422
    assert reason in r.json()["detail"]
    assert r.json()["model_version"] == old
    assert versions(client) == {old}
    after = client.get("/recommend/3", params={"k": 10}).json()
    assert after.pop("request_id") and after == before
    # the failed files were not remembered: a plain reload reads the serving ones
    assert client.post("/admin/reload").json()["model_version"] == old


@pytest.mark.parametrize("outside", ["/etc/passwd", "/etc", "{tmp}/../../etc/passwd"])
def test_files_outside_the_model_folders_are_refused(
    client: TestClient, tmp_path: Path, outside: str
) -> None:
    """An admin call must not make the server read arbitrary files; /etc/passwd answered 422
    "list index out of range" after reading it."""
    (old,) = versions(client)
    path = outside.format(tmp=tmp_path)
    for field in ("checkpoint", "features"):
        r = client.post("/admin/reload", json={field: path})
        assert r.status_code == 422
        assert "outside the model folders" in r.json()["detail"]
        assert "VISREC_MODEL_DIRS" in r.json()["detail"]
        assert r.json()["model_version"] == old


@pytest.mark.parametrize("path", ["runs/a\x00b.pt", "runs/\ud800.pt"], ids=["nul", "surrogate"])
def test_a_path_that_is_not_one_is_refused(client: TestClient, path: str) -> None:
    """A NUL byte or a lone surrogate in a path answered 500 (Path.resolve raised)."""
    (old,) = versions(client)
    for field in ("checkpoint", "features"):
        body = json.dumps({field: path}, ensure_ascii=True)  # \ud800 stays a lone surrogate
        r = client.post("/admin/reload", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert "is not a usable path" in r.json()["detail"]
        assert r.json()["model_version"] == old


def test_features_that_do_not_exist_are_refused(client: TestClient, tmp_path: Path) -> None:
    (old,) = versions(client)
    r = client.post("/admin/reload", json={"features": str(tmp_path / "nowhere")})
    assert r.status_code == 422
    assert "nowhere" in r.json()["detail"]
    assert versions(client) == {old}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _other_features(checkpoint: Path, out: Path) -> Path:
    """The same weights, labelled as trained on other features (another backbone's)."""
    ckpt = load_checkpoint(checkpoint)
    other = {**ckpt.features, "inputs_hash": "f" * 64, "backbone": "resnet50"}
    save_checkpoint(out, dataclasses.replace(ckpt, features=other))
    return out


def _long_profiles(checkpoint: Path, out: Path) -> Path:
    """The same weights, labelled as trained on each user's last 12 items."""
    ckpt = load_checkpoint(checkpoint)
    save_checkpoint(
        out, dataclasses.replace(ckpt, train_config={**ckpt.train_config, "profile_size": 12})
    )
    return out


def test_a_model_reads_as_many_newest_items_as_it_was_trained_on(
    client: TestClient, world: World, world_features: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """A model trained on the last 4 items was served the last 9."""
    prepared = prepare(world.root, world_features[0])
    config = dataclasses.replace(CONFIG, profile_size=4)
    short = tmp_path / "short.pt"
    result = fit(prepared, config, device=torch.device("cpu"), progress=False)
    save_checkpoint(short, to_checkpoint(prepared, result, config))
    same_tail = ([1, 2, 3, 10, 11, 12, 13], [7, 8, 9, 10, 11, 12, 13])  # the last 4 agree

    def answers() -> list[list[dict]]:
        return [
            client.post(
                "/recommend", json={"history": list(h), "k": 10, "exclude_seen": False}
            ).json()["items"]
            for h in same_tail
        ]

    nine = answers()
    assert nine[0] != nine[1]  # the 9-item model reads the older items too
    assert client.post("/admin/reload", json={"checkpoint": str(short)}).status_code == 200
    four = answers()
    assert four[0] == four[1]


def test_one_reload_at_a_time_while_the_old_model_serves(
    client: TestClient, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    (old,) = versions(client)
    started, release = threading.Event(), threading.Event()
    read = engine_module.read_checkpoint

    def slow_read(path: Path, **kwargs: object) -> object:
        started.set()
        assert release.wait(10)
        return read(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "read_checkpoint", slow_read)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/admin/reload", json={"checkpoint": str(files.b)})
        assert started.wait(10)
        second = client.post("/admin/reload", json={"checkpoint": str(files.a)})
        assert second.status_code == 409
        assert second.json()["model_version"] == old
        assert versions(client) == {old}  # loading happens off the event loop
        release.set()
        assert first.result().status_code == 200
    assert versions(client) == {first.result().json()["model_version"]}


def test_no_request_fails_or_mixes_models_during_reloads(client: TestClient, files: Files) -> None:
    """Readers and writers run while the model is swapped back and forth. Every answer is 2xx
    and names the old or the new model; one sent after a reload returned names the new one."""
    (first,) = versions(client)
    swaps: list[tuple[float, float, str]] = [(0.0, time.monotonic(), first)]  # (sent, done, new)
    answers: list[tuple[float, float, int, str | None]] = []  # (sent, done, status, version)
    stop = threading.Event()

    def hammer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            if n % 4 == 0:
                event = {"user_id": f"load-{worker}", "item_id": 1 + n % 200}
                r = client.post("/interactions", json={"events": [event]})
                version = None
            elif n % 4 == 1:
                r = client.post("/recommend", json={"history": [1 + n % 200, 7], "k": 5})
                version = r.json().get("model_version")
            else:
                r = client.get(f"/recommend/{n % 120}", params={"k": 5})
                version = r.json().get("model_version")
            answers.append((sent, time.monotonic(), r.status_code, version))

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer, w) for w in range(4)]
        time.sleep(0.3)
        for target in (files.b, files.a, files.b):
            sent = time.monotonic()
            r = client.post("/admin/reload", json={"checkpoint": str(target)})
            assert r.status_code == 200, r.text
            swaps.append((sent, time.monotonic(), r.json()["model_version"]))
            time.sleep(0.3)
        stop.set()
        for w in workers:
            w.result()

    assert {status for _, _, status, _ in answers} == {200}, "a request failed during a swap"
    served = {v for *_, v in answers if v is not None}
    assert served == {swaps[1][2], swaps[2][2]}  # both models answered, no other
    for (_, done, version), (next_sent, _, _) in zip(
        swaps, [*swaps[1:], (np.inf, 0, "")], strict=True
    ):
        between = [v for s, d, _, v in answers if s > done and d < next_sent and v is not None]
        assert between, "no answer between two reloads: the load did not span the swaps"
        assert set(between) == {version}


def test_the_old_model_is_released_after_a_swap(client: TestClient, files: Files) -> None:
    state: State = client.app_state["app_state"]
    old = weakref.ref(state.engine)
    assert client.post("/admin/reload", json={"checkpoint": str(files.b)}).status_code == 200
    client.get("/recommend/3")
    assert old() is None  # freed by reference counting: no cycle, no stale reference


def test_reload_needs_an_admin_key(files: Files, tmp_path: Path) -> None:
    keys = {"environment": "production", "api_keys": WRITER, "admin_keys": ADMIN}
    with serving(files, tmp_path, **keys) as c:
        body = {"checkpoint": str(files.b)}
        assert c.post("/admin/reload", json=body).status_code == 401
        assert c.post("/admin/reload", json=body, headers={"X-API-Key": WRITER}).status_code == 401
        assert c.get("/recommend/3").json()["model_version"].endswith(digest(files.a))
        r = c.post("/admin/reload", json=body, headers={"X-API-Key": ADMIN})
        assert r.status_code == 200
        assert c.get("/recommend/3").json()["model_version"].endswith(digest(files.b))


def test_sighup_reloads_the_serving_files(files: Files, tmp_path: Path) -> None:
    """What a deployment does: drop the new checkpoint in place, then ``kill -HUP``."""
    ckpt = tmp_path / "serving.pt"
    shutil.copy(files.a, ckpt)
    source, load = Source(ckpt, files.features), partial(load_engine, device=torch.device("cpu"))

    async def hang_up() -> str:
        slot = ModelSlot(load(source), source, load)
        with reload_on_hangup(slot, asyncio.get_running_loop()) as installed:
            assert installed  # pytest runs tests in the main thread, as uvicorn runs its loop
            shutil.copy(files.b, ckpt)
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + 10
            while slot.engine.version.endswith(digest(files.a)) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        return slot.engine.version

    assert asyncio.run(hang_up()).endswith(f"/{digest(files.b)}")
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # handed back on the way out


def test_serving_tables_are_written_once_then_mapped(files: Files, tmp_path: Path) -> None:
    features = tmp_path / "features"
    shutil.copytree(files.features, features, ignore=shutil.ignore_patterns("serving"))
    source = Source(files.a, features)
    first = load_engine(source, device=torch.device("cpu"), index="hnsw")
    (folder,) = (features / "serving").iterdir()
    assert folder.name == digest(files.a)[:12]
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "tables.json" in written and any(n.startswith("index-hnsw-") for n in written)
    again = load_engine(source, device=torch.device("cpu"), index="hnsw")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # only read
    assert isinstance(again.serving.tables.reduced.parts[0], np.memmap)
    user, history = next(iter(files.profiles.items()))
    query = Query(user, history, set(history), k=10)
    assert again.recommend([query]) == first.recommend([query])

    # Where nothing can be written, the tables are computed in memory: the same answers.
    blocked = tmp_path / "blocked"
    shutil.copytree(files.features, blocked, ignore=shutil.ignore_patterns("serving"))
    (blocked / "serving").write_text("not a folder")
    in_memory = load_engine(Source(files.a, blocked), device=torch.device("cpu"), index="hnsw")
    assert not isinstance(in_memory.serving.tables.reduced.parts[0], np.memmap)
    assert in_memory.recommend([query]) == first.recommend([query])
