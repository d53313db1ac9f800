"""API keys, rate limits and body limits, on the real app (in-process store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.security import Keys, RateLimiter
from service.config import Settings
from service.model.checkpoint import save_checkpoint
from service.offline.pipeline import fit, prepare, to_checkpoint
from service.offline.synthetic import World
from service.offline.train import TrainConfig

WRITER = "w-" + "a1" * 12
ADMIN = "adm-" + "b2" * 12
CONFIG = TrainConfig(dim=8, attention_dim=8, epochs=2, batch_size=256, lr=1e-2)


@pytest.fixture(scope="module")
def paths(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    prepared = prepare(world.root, world_features[0])
    result = fit(prepared, CONFIG, device=torch.device("cpu"), progress=False)
    ckpt = tmp_path_factory.mktemp("security") / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, result, CONFIG))
    return {"checkpoint": ckpt, "features": world_features[0]}


def make_client(paths: dict[str, Path], **settings: object) -> TestClient:
    base = {"environment": "production", "api_keys": WRITER, "admin_keys": ADMIN, "device": "cpu"}
    return TestClient(create_app(Settings(**paths, **{**base, **settings})))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(paths: dict[str, Path]) -> Iterator[TestClient]:
    with make_client(paths) as c:
        yield c


EVENT = {"events": [{"user_id": "sec-1", "item_id": 1}]}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "without API keys"),
        ({"api_keys": "changeme"}, "placeholder or short"),
        ({"api_keys": f"{WRITER},short"}, "placeholder or short"),
        ({"admin_keys": "secret"}, "placeholder or short"),
    ],
)
def test_production_refuses_missing_or_placeholder_keys(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(checkpoint="x", features="y", environment="production", **settings)  # type: ignore[arg-type]


def test_development_runs_without_keys() -> None:
    settings = Settings(checkpoint="x", features="y", environment="development")  # type: ignore[arg-type]
    assert settings.api_keys == ""


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "nope" * 8}, 401),
        ({"X-API-Key": WRITER}, 200),
        ({"X-API-Key": ADMIN}, 200),
    ],
)
def test_writes_need_a_write_or_admin_key(
    client: TestClient, headers: dict[str, str], status: int
) -> None:
    r = client.post("/interactions", json=EVENT, headers=headers)
    assert r.status_code == status
    if status == 401:
        assert "API key" in r.json()["detail"]


def test_reads_are_open_unless_configured(client: TestClient, paths: dict[str, Path]) -> None:
    assert client.get("/recommend/3").status_code == 200
    with make_client(paths, auth_reads=True) as locked:
        assert locked.get("/recommend/3").status_code == 401
        assert locked.post("/recommend", json={"history": [1, 2]}).status_code == 401
        assert locked.get("/recommend/3", headers={"X-API-Key": WRITER}).status_code == 200
        assert locked.get("/healthz").status_code == 200  # health stays open


def test_health_and_metrics_are_open_and_reveal_no_key(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert WRITER not in r.text and ADMIN not in r.text


def test_over_the_rate_limit_is_429_with_retry_after(paths: dict[str, Path]) -> None:
    with make_client(paths, rate_limit_per_s=0.5, rate_burst=2) as c:
        codes = [c.get("/recommend/3").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        last = c.get("/recommend/3")
        assert last.status_code == 429 and int(last.headers["Retry-After"]) >= 1
        # another key has its own bucket
        assert c.get("/recommend/3", headers={"X-API-Key": ADMIN}).status_code == 200


def test_an_oversized_body_is_refused_before_parsing(paths: dict[str, Path]) -> None:
    with make_client(paths, max_body_bytes=2048) as c:
        big = {"events": [{"user_id": "u", "item_id": 1}] * 200}
        r = c.post("/interactions", json=big, headers={"X-API-Key": WRITER})
        assert r.status_code == 413
        assert "detail" in r.json()
        chunks = (b'{"events": [' + b'{"user_id": "u", "item_id": 1},' * 40 for _ in range(3))
        streamed = c.post("/interactions", content=chunks, headers={"X-API-Key": WRITER})
        assert streamed.status_code == 413  # no Content-Length: counted while read
        assert "detail" in streamed.json()


def test_rate_limiter_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.wait("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait("a") == pytest.approx(0.5)  # empty: half a second to the next token
    now[0] = 0.5
    assert limiter.wait("a") == 0.0
    assert limiter.wait("b") == 0.0  # callers do not share buckets


def test_limiter_forgets_the_least_recent_callers_beyond_its_bound() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=lambda: 0.0, max_callers=2)
    limiter.wait("a")
    limiter.wait("b")
    limiter.wait("c")  # "a" is forgotten, so it starts with a full bucket again
    assert limiter.wait("a") == 0.0
    assert limiter.wait("c") > 0


def test_keys_compare_every_key_and_admin_implies_write() -> None:
    keys = Keys(write=("w" * 20,), admin=("a" * 20,), auth_reads=False)
    assert keys.allows(None, "read")
    assert keys.allows("a" * 20, "write") and keys.allows("a" * 20, "admin")
    assert keys.allows("w" * 20, "write") and not keys.allows("w" * 20, "admin")
    assert not keys.allows("w" * 19, "write")


def test_visrec_serve_refuses_production_without_keys_before_building(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from service import serve

    monkeypatch.setenv("VISREC_ENVIRONMENT", "production")
    monkeypatch.delenv("VISREC_API_KEYS", raising=False)
    monkeypatch.setattr("sys.argv", ["visrec-serve", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        serve.main()
    assert exited.value.code == 2
    assert "without API keys" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was built
