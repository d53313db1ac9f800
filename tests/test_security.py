"""API keys, rate limits and body limits, on the real app (in-process store)."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
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
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint

WRITER = "w-0123456789abcdefghijkl"
ADMIN = "adm-ABCDEFGHIJKLMNOPQRSTUV"
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


def make_client(
    paths: dict[str, Path], *, peer: str = "testclient", **settings: object
) -> TestClient:
    base = {"environment": "production", "api_keys": WRITER, "admin_keys": ADMIN, "device": "cpu"}
    app = create_app(Settings(**paths, **{**base, **settings}))  # type: ignore[arg-type]
    return TestClient(app, client=(peer, 50000))


@pytest.fixture(scope="module")
def client(paths: dict[str, Path]) -> Iterator[TestClient]:
    with make_client(paths) as c:
        yield c


EVENT = {"events": [{"user_id": "sec-1", "item_id": 1}]}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "without API keys"),
        ({"api_keys": "changeme"}, "placeholder, short or repetitive"),
        ({"api_keys": f"{WRITER},short"}, "placeholder, short or repetitive"),
        ({"admin_keys": "secret"}, "placeholder, short or repetitive"),
        ({"api_keys": "a" * 16}, "10 of them distinct"),  # long enough, but one character
        ({"api_keys": "0123456789" * 2 + "," + "abcabcabcabcabcabcabc"}, "repetitive"),
    ],
)
def test_production_refuses_missing_or_placeholder_keys(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(checkpoint="x", features="y", environment="production", **settings)  # type: ignore[arg-type]


def test_a_random_key_is_accepted() -> None:
    key = secrets.token_urlsafe(32)
    assert Settings(checkpoint="x", features="y", environment="production", api_keys=key)  # type: ignore[arg-type]


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


def test_made_up_keys_do_not_escape_the_rate_limit(paths: dict[str, Path]) -> None:
    """With reads open, buckets were keyed by the unverified header: a new key per request was
    never limited. Only a valid key has a bucket of its own."""
    with make_client(paths, rate_limit_per_s=0.5, rate_burst=2) as c:
        codes = [
            c.get("/recommend/3", headers={"X-API-Key": secrets.token_hex(16)}).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 429, 429]
        assert c.get("/recommend/3", headers={"X-API-Key": WRITER}).status_code == 200


def test_forwarded_for_is_believed_from_trusted_proxies_only(paths: dict[str, Path]) -> None:
    def codes(c: TestClient) -> list[int]:
        return [
            c.get("/recommend/3", headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
            for n in range(4)
        ]

    # From any peer, a made-up X-Forwarded-For per request used to be a new client each time.
    with make_client(paths, peer="127.0.0.1", rate_limit_per_s=0.5, rate_burst=2) as c:
        assert codes(c) == [200, 200, 429, 429]
    proxied = {"peer": "10.1.2.3", "trusted_proxies": "10.0.0.0/8, 127.0.0.1"}
    with make_client(paths, rate_limit_per_s=0.5, rate_burst=2, **proxied) as c:
        assert codes(c) == [200, 200, 200, 200]  # four clients behind the proxy
        spoofed = {"X-Forwarded-For": "198.51.100.7, 203.0.113.1"}  # the proxy appends
        assert c.get("/recommend/3", headers=spoofed).status_code == 200
        assert c.get("/recommend/3", headers=spoofed).status_code == 429  # 203.0.113.1 again


def test_failed_authentications_are_limited_per_address(paths: dict[str, Path]) -> None:
    with make_client(paths, auth_failures_per_s=0.01, auth_failure_burst=3) as c:
        wrong = [
            c.post("/interactions", json=EVENT, headers={"X-API-Key": f"guess-{n}"}).status_code
            for n in range(5)
        ]
        assert wrong == [401, 401, 401, 429, 429]
        r = c.post("/interactions", json=EVENT, headers={"X-API-Key": "guess-5"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        # Behind NAT, another client of the address with a valid key is not locked out
        # (it got 429 too): the block is on wrong keys, not on the address.
        assert c.post("/interactions", json=EVENT, headers={"X-API-Key": WRITER}).is_success
    with make_client(paths, auth_failures_per_s=0.01, auth_failure_burst=3) as c:
        for _ in range(10):  # successes cost nothing from the failures' bucket
            assert c.post("/interactions", json=EVENT, headers={"X-API-Key": WRITER}).is_success


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


def test_the_limiter_can_be_asked_without_taking_a_token() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=lambda: 0.0)
    assert limiter.peek("a") == 0.0
    assert limiter.wait("a") == 0.0
    assert limiter.peek("a") == pytest.approx(1.0)
    assert limiter.peek("a") == pytest.approx(1.0)  # peeking took nothing


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
    err = capsys.readouterr().err
    assert "without API keys" in err
    assert err.count("\n") == 1 and "pydantic" not in err and "input_value" not in err  # one line
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_an_empty_variable_is_an_unset_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose passes VISREC_DATA as ${DATA:+/data}: empty without a dataset, which
    must mean the synthetic world, not the folder "."."""
    from service import serve

    monkeypatch.setenv("VISREC_ENVIRONMENT", "development")
    monkeypatch.setenv("VISREC_DATA", "")
    monkeypatch.setenv("VISREC_REDIS_PREFIX", "")
    env = serve.environment()
    assert not isinstance(env, str)
    assert (env.data, env.redis_prefix, env.workers) == (None, "visrec", 1)


def test_host_and_port_are_settings_under_the_names_platforms_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import serve

    monkeypatch.setenv("VISREC_ENVIRONMENT", "development")
    env = serve.environment()
    assert not isinstance(env, str) and (env.host, env.port) == ("127.0.0.1", 8000)
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "9100")
    env = serve.environment()
    assert not isinstance(env, str) and (env.host, env.port) == ("0.0.0.0", 9100)
    # what Kubernetes sets for a Service named "visrec" is not read as the port
    monkeypatch.setenv("VISREC_PORT", "tcp://10.0.0.7:8000")
    env = serve.environment()
    assert not isinstance(env, str) and env.port == 9100
    monkeypatch.setenv("PORT", "eighty")
    assert serve.environment() == (
        "PORT: Input should be a valid integer, unable to parse string as an integer"
    )


def test_visrec_serve_help_is_quick_and_complete() -> None:
    """--help took ~9 s: torch was imported before the arguments were parsed."""
    code = (
        "import sys, service.serve as s; text = s.parser().format_help(); "
        "print('torch' in sys.modules); print(text)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, text = run.stdout.split("\n", 1)
    assert torch_loaded == "False"
    for name in ("HOST", "PORT", "VISREC_API_KEYS", "VISREC_ENVIRONMENT", "VISREC_REDIS_URL"):
        assert name in text
    from service import serve

    assert all(action.help for action in serve.parser()._actions)


def test_the_in_process_store_is_bounded_and_says_so_in_metrics(paths: dict[str, Path]) -> None:
    with make_client(paths, memory_store_max_users=2) as c:
        for user in ("m1", "m2", "m3"):
            body = {"events": [{"user_id": user, "item_id": 1}]}
            assert c.post("/interactions", json=body, headers={"X-API-Key": WRITER}).is_success
        assert "visrec_memory_store_evicted_users_total" in c.get("/metrics").text
        # two users fit: the least recent, m1, was forgotten
        evicted = re.search(
            r"visrec_memory_store_evicted_users_total ([\d.]+)", c.get("/metrics").text
        )
        assert evicted and float(evicted.group(1)) >= 1
        assert c.get("/recommend/m1").json()["fallback"] is True
        assert c.get("/recommend/m3").json()["fallback"] is False


def test_the_page_and_item_routes_are_guarded_and_limited(paths: dict[str, Path]) -> None:
    with make_client(paths, auth_reads=True, rate_limit_per_s=0.5, rate_burst=2) as c:
        assert c.get("/items/1").status_code == 401  # titles are reads like any other
        assert c.get("/items/1/image").status_code == 401
        assert c.get("/items/1", headers={"X-API-Key": WRITER}).status_code == 404  # no catalogue
        # The page itself holds no data and a browser sends no key to open it: rate-limited.
        codes = [c.get("/ui/users/7").status_code for _ in range(4)]
        assert codes[0] == 200 and codes[-1] == 429
