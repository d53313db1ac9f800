"""The HTTP service on the synthetic world, with its lifespan running (in-process store)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from redis import Redis

from harness.redis_servers import redis_prefix
from service.api.app import create_app
from service.api.lifespan import ended
from service.config import Settings
from service.model.checkpoint import save_checkpoint
from service.offline.bootstrap import histories, history_times
from service.offline.cli import main
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.registry import Registry
from service.store.profiles import timed_recent

REDIS = "redis://127.0.0.1:6379/0"
CONFIG = TrainConfig(dim=16, attention_dim=16, epochs=6, batch_size=128, lr=1e-2)


@pytest.fixture(scope="module", params=["memory", "redis"])
def client(
    request: pytest.FixtureRequest,
    world: World,
    world_features: tuple[Path, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    prepared = prepare(world.root, world_features[0])
    result = fit(prepared, CONFIG, device=torch.device("cpu"), progress=False)
    ckpt = tmp_path_factory.mktemp("serve") / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, result, CONFIG))
    redis = {"redis_url": REDIS, "redis_prefix": f"test-{uuid.uuid4().hex}"}
    settings = Settings(
        checkpoint=ckpt,
        features=world_features[0],
        device="cpu",
        **(redis if request.param == "redis" else {}),
    )
    app = create_app(settings, profiles=histories(load_dataset(world.root)))
    with TestClient(app) as c:
        yield c
    if request.param == "redis":
        client = Redis.from_url(REDIS)
        keys = list(client.scan_iter(f"{redis['redis_prefix']}:*", count=1000))
        if keys:
            client.delete(*keys)


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True
    assert ready["items"] == 200


def test_recommendations_are_unseen_items_of_the_users_kind(
    client: TestClient, world: World
) -> None:
    hist = histories(load_dataset(world.root))
    shares = []
    for user in range(0, 120, 10):
        body = client.get(f"/recommend/{user}", params={"k": 10}).json()
        items = [x["item_id"] for x in body["items"]]
        assert len(items) == 10
        assert body["fallback"] is False
        assert not set(items) & set(hist[str(user)])
        scores = [x["score"] for x in body["items"]]
        assert scores == sorted(scores, reverse=True)
        shares.append(np.mean(world.item_kinds[np.array(items) - 1] == world.user_kinds[user]))
    assert np.mean(shares) > 0.6  # chance is 0.25


def test_pages_continue_each_other(client: TestClient) -> None:
    first = client.get("/recommend/3", params={"k": 10}).json()["items"]
    second = client.get("/recommend/3", params={"k": 5, "offset": 5}).json()["items"]
    assert [x["item_id"] for x in second] == [x["item_id"] for x in first[5:]]
    kept = client.get("/recommend/3", params={"k": 10, "exclude_seen": "false"}).json()["items"]
    assert [x["item_id"] for x in kept] != [x["item_id"] for x in first]


def test_an_unknown_user_gets_popular_items(client: TestClient) -> None:
    body = client.get("/recommend/nobody-knows-me", params={"k": 7}).json()
    assert body["fallback"] is True
    assert len(body["items"]) == 7
    # one meaning per field: no model score for them, their interaction counts apart
    assert [x["score"] for x in body["items"]] == [None] * 7
    counts = [x["popularity"] for x in body["items"]]
    assert counts == sorted(counts, reverse=True) and all(isinstance(n, int) for n in counts)
    known = client.get("/recommend/3", params={"k": 3}).json()["items"]
    assert all(x["popularity"] is None and isinstance(x["score"], float) for x in known)


def test_interactions_are_read_back_at_once(client: TestClient) -> None:
    events = [{"user_id": "new-user", "item_id": i, "event_id": f"e{i}"} for i in (5, 9, 12)]
    r = client.post("/interactions", json={"events": events})
    assert r.status_code == 200
    assert r.json() == {"received": 3, "applied": 3}
    again = client.post("/interactions", json={"events": events}).json()
    assert again["applied"] == 0  # idempotent by event_id
    body = client.get("/recommend/new-user", params={"k": 20}).json()
    assert body["fallback"] is False
    assert not {5, 9, 12} & {x["item_id"] for x in body["items"]}
    why = client.get("/explain/new-user", params={"item_id": body["items"][0]["item_id"]}).json()
    assert [p["item_id"] for p in why["profile"]] == [5, 9, 12]


def test_unknown_items_reject_the_whole_batch(client: TestClient) -> None:
    events = [{"user_id": "u-x", "item_id": 3}, {"user_id": "u-x", "item_id": 99999}]
    r = client.post("/interactions", json={"events": events})
    assert r.status_code == 422
    assert r.json()["unknown_item_ids"] == [99999]
    assert client.get("/recommend/u-x").json()["fallback"] is True  # nothing was applied


def test_explanation_attention_sums_to_one(client: TestClient) -> None:
    item = client.get("/recommend/7", params={"k": 1}).json()["items"][0]
    why = client.get("/explain/7", params={"item_id": item["item_id"]}).json()
    assert len(why["profile"]) == 9
    assert sum(p["attention"] for p in why["profile"]) == pytest.approx(1.0, abs=1e-5)
    for p in why["profile"]:
        assert np.array(p["components"]).shape == (7, 7)
        assert np.sum(p["components"]) == pytest.approx(1.0, abs=1e-4)
    assert why["score"] == pytest.approx(item["score"], rel=1e-4)


def test_an_anonymous_history_is_recommended_for(client: TestClient, world: World) -> None:
    circles = (np.flatnonzero(world.item_kinds == 0) + 1)[:9].tolist()
    body = client.post("/recommend", json={"history": circles, "k": 10}).json()
    items = np.array([x["item_id"] for x in body["items"]])
    assert not set(items.tolist()) & set(circles)
    assert np.mean(world.item_kinds[items - 1] == 0) > 0.5


def test_an_anonymous_history_is_explained_as_it_is_ranked(
    client: TestClient, world: World
) -> None:
    history = (np.flatnonzero(world.item_kinds == 2) + 1)[:12].tolist()
    top = client.post("/recommend", json={"history": history, "k": 1}).json()["items"][0]
    why = client.post("/explain", json={"history": history, "item_id": top["item_id"]}).json()
    assert [p["item_id"] for p in why["profile"]] == history[-9:]
    assert sum(p["attention"] for p in why["profile"]) == pytest.approx(1.0, abs=1e-5)
    assert why["user_id"] is None
    assert why["score"] == pytest.approx(top["score"], rel=1e-4)


@pytest.mark.parametrize(
    ("method", "url", "kwargs"),
    [
        ("get", "/recommend/1", {"params": {"k": 0}}),
        ("get", "/recommend/1", {"params": {"k": 1001}}),
        ("get", "/recommend/1", {"params": {"k": "many"}}),
        ("get", "/recommend/1", {"params": {"offset": -1}}),
        (
            "post",
            "/interactions",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
        ),
        ("post", "/interactions", {"json": {"events": []}}),
        ("post", "/interactions", {"json": {"events": [{"user_id": "a", "item_id": "x"}]}}),
        ("post", "/interactions", {"json": {"events": [{"user_id": "a", "item_id": 1}] * 1001}}),
        ("post", "/recommend", {"json": {"history": [1, 2, 424242]}}),
        ("get", "/explain/1", {"params": {"item_id": 424242}}),
        ("get", "/explain/1", {}),
        ("post", "/explain", {"json": {"history": [1, 424242], "item_id": 1}}),
        ("post", "/explain", {"json": {"history": [1, 2]}}),
        ("post", "/recommend", {"json": {"history": [1, 2], "timestamps": [5.0]}}),
        ("post", "/explain", {"json": {"history": [1], "item_id": 2, "timestamps": [-1.0]}}),
    ],
)
def test_bad_input_is_a_4xx_with_a_reason(
    client: TestClient, method: str, url: str, kwargs: dict[str, object]
) -> None:
    r = getattr(client, method)(url, **kwargs)
    assert 400 <= r.status_code < 500
    assert "detail" in r.json()


@pytest.mark.parametrize("path", ["/recommend/{}", "/explain/{}?item_id=1"])
@pytest.mark.parametrize("user", ["a%00b", "a%0D%0Ab", "x" * 10_000], ids=["nul", "crlf", "10kb"])
def test_reads_refuse_the_user_ids_writes_refuse(client: TestClient, path: str, user: str) -> None:
    """One rule for ids everywhere: these answered 200 on reads while writes refused them."""
    r = client.get(path.format(user))
    assert r.status_code == 422, r.text
    assert "user_id" in str(r.json()["detail"])


def test_settings_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISREC_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="checkpoint"):
        Settings()  # type: ignore[call-arg]


def test_concurrent_requests_get_the_answers_they_would_get_alone(client: TestClient) -> None:
    users = [str(u) for u in range(0, 60, 3)]
    alone = {u: client.get(f"/recommend/{u}", params={"k": 5}).json()["items"] for u in users}
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(
            pool.map(lambda u: client.get(f"/recommend/{u}", params={"k": 5}).json(), users)
        )
    for u, body in zip(users, together, strict=True):
        # batched matrix products may differ from single ones in the last bits
        assert [x["item_id"] for x in body["items"]] == [x["item_id"] for x in alone[u]]
        assert [x["score"] for x in body["items"]] == pytest.approx(
            [x["score"] for x in alone[u]], rel=1e-5
        )


def test_metrics_count_requests_per_endpoint_and_stage(client: TestClient) -> None:
    client.get("/recommend/1", params={"k": 3})
    client.get("/recommend/2", params={"k": 3})
    text = client.get("/metrics").text
    count = re.search(
        r'visrec_request_seconds_count\{endpoint="/recommend/\{user_id\}",method="GET",'
        r'status="200"\} (\d+)',
        text,
    )
    assert count and int(float(count.group(1))) >= 2
    assert 'visrec_stage_seconds_count{stage="model"}' in text
    assert 'visrec_stage_seconds_count{stage="store"}' in text


def test_metrics_label_refused_requests_with_their_status(client: TestClient) -> None:
    client.get("/recommend/1", params={"k": 0})
    text = client.get("/metrics").text
    assert re.search(
        r'visrec_request_seconds_count\{endpoint="/recommend/\{user_id\}",method="GET",'
        r'status="422"\} [1-9]',
        text,
    )


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/recommend", b'{"history": [NaN]}', "history"),
        ("/recommend", b'{"history": [Infinity]}', "history"),
        ("/recommend", b'{"history": [1e400]}', "history"),
        ("/recommend", b'{"history": [1], "k": NaN}', "k"),
        ("/recommend", b'{"history": [1], "offset": -Infinity}', "offset"),
        ("/interactions", b'{"events": [{"user_id": "u", "item_id": 1e400}]}', "item_id"),
        ("/interactions", b'{"events": [{"user_id": "u", "item_id": NaN}]}', "item_id"),
        ("/interactions", b'{"events": [{"user_id": "\\ud800", "item_id": 1}]}', "user_id"),
        (
            "/interactions",
            b'{"events": [{"user_id": "u", "item_id": 1, "event_id": "e\\udfff"}]}',
            "event_id",
        ),
        ("/explain", b'{"history": [1], "item_id": Infinity}', "item_id"),
    ],
)
def test_non_finite_numbers_and_lone_surrogates_are_a_422_naming_the_field(
    client: TestClient, url: str, body: bytes, field: str
) -> None:
    """The default 422 handler echoed the input, which JSON cannot carry: a 500 instead."""
    r = client.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert any(field in e["loc"] for e in r.json()["detail"]), r.json()


def test_user_ids_are_the_ones_get_can_reach(client: TestClient) -> None:
    slash = {"events": [{"user_id": "team/alice", "item_id": 3}]}
    r = client.post("/interactions", json=slash)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "user_id"
    control = {"events": [{"user_id": "a\nb", "item_id": 3}]}
    assert client.post("/interactions", json=control).status_code == 422
    # dataset user ids are integers: 987654 is the user "987654"
    number = {"events": [{"user_id": 987654, "item_id": 3, "event_id": "int-1"}]}
    assert client.post("/interactions", json=number).json()["applied"] == 1
    body = client.get("/recommend/987654").json()
    assert body["fallback"] is False
    assert 3 not in [x["item_id"] for x in body["items"]]
    again = {"events": [{"user_id": "987654", "item_id": 3, "event_id": "int-1"}]}
    assert client.post("/interactions", json=again).json()["applied"] == 0  # the same user
    for bad in (True, -1, 2**64, 1.5):
        r = client.post("/interactions", json={"events": [{"user_id": bad, "item_id": 3}]})
        assert r.status_code == 422, bad


def test_a_body_that_is_not_json_by_its_content_type_is_told_so(client: TestClient) -> None:
    """``curl -d`` sends a form: FastAPI answered "Input should be a valid dictionary"."""
    r = client.post(
        "/interactions",
        content=b'{"events": [{"user_id": "u", "item_id": 1}]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    assert "application/json" in r.json()["detail"]
    untyped = client.post("/recommend", content=b'{"history": [1]}')
    assert untyped.status_code == 415
    assert "without a Content-Type" in untyped.json()["detail"]


def test_an_event_id_reused_for_another_event_is_a_409_naming_it(client: TestClient) -> None:
    first = {"events": [{"user_id": "u-409", "item_id": 3, "event_id": "same"}]}
    assert client.post("/interactions", json=first).json()["applied"] == 1
    other = {
        "events": [
            {"user_id": "u-409b", "item_id": 4, "event_id": "fresh"},
            {"user_id": "u-409", "item_id": 5, "event_id": "same"},
        ]
    }
    r = client.post("/interactions", json=other)
    assert r.status_code == 409
    assert r.json()["event_ids"] == ["same"] and "same" in r.json()["detail"]
    assert client.get("/recommend/u-409b").json()["fallback"] is True  # nothing applied
    assert client.post("/interactions", json=first).json()["applied"] == 0  # a true retry


@pytest.mark.parametrize(
    "timestamp",
    [b"NaN", b"Infinity", b"-Infinity", b"1e300", b"-1e300", b"-1", b"1e400", b'"soon"'],
)
def test_absurd_timestamps_are_a_422(client: TestClient, timestamp: bytes) -> None:
    body = b'{"events": [{"user_id": "u-ts", "item_id": 3, "timestamp": %s}]}' % timestamp
    r = client.post("/interactions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == "timestamp"


def test_a_timestamp_from_the_future_is_a_422(client: TestClient) -> None:
    ahead = time.time() + 3 * 24 * 3600
    event = {"user_id": "u-future", "item_id": 3, "timestamp": ahead}
    r = client.post("/interactions", json={"events": [event]})
    assert r.status_code == 422
    assert r.json()["timestamps"] == [ahead]
    assert client.get("/recommend/u-future").json()["fallback"] is True


def test_a_late_event_takes_its_place_in_time(client: TestClient) -> None:
    now = time.time()
    events = [{"user_id": "u-late", "item_id": i, "timestamp": now - 100 + i} for i in range(1, 10)]
    client.post("/interactions", json={"events": events})
    late = {"user_id": "u-late", "item_id": 20, "timestamp": now - 1000}  # sent last, oldest
    client.post("/interactions", json={"events": [late]})
    item = client.get("/recommend/u-late", params={"k": 1}).json()["items"][0]["item_id"]
    why = client.get("/explain/u-late", params={"item_id": item}).json()
    assert [p["item_id"] for p in why["profile"]] == list(range(1, 10))


def test_every_route_is_described_in_openapi(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    undescribed = [
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if len(operation.get("description", "")) < 20
    ]
    assert undescribed == []
    assert spec["info"]["description"]


FUTURE = time.time() + 3 * 24 * 3600


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"),
    [
        ("post", "/interactions", {"json": {"events": [{"user_id": "u", "item_id": 10**9}]}},
         422, "unknown_items"),
        ("post", "/interactions",
         {"json": {"events": [{"user_id": "u", "item_id": 3, "timestamp": FUTURE}]}},
         422, "future_timestamps"),
        ("get", "/recommend/u?k=0", {}, 422, "invalid_fields"),
        ("post", "/recommend", {"content": b'{"history": [1]}'}, 415, "not_json"),
        ("post", "/interactions",
         {"content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}},
         413, "body_too_large"),
        ("get", "/nowhere", {}, 404, "not_found"),
        ("get", "/items/424242", {}, 404, "not_found"),
        ("post", "/admin/reload", {"json": {"checkpoint": "/etc/passwd"}}, 422,
         "outside_model_folders"),
    ],
    ids=["unknown-items", "future", "invalid", "not-json", "too-large", "no-route", "no-item",
         "outside"],
)  # fmt: skip
def test_every_refusal_is_one_body_with_a_stable_code(
    client: TestClient, method: str, url: str, kwargs: dict[str, object], status: int, code: str
) -> None:
    r = getattr(client, method)(url, **kwargs)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert r.json()["detail"]


def test_a_refusal_carries_the_fields_of_its_kind(client: TestClient) -> None:
    unknown = client.post("/recommend", json={"history": [3, 10**9]}).json()
    assert unknown["unknown_item_ids"] == [10**9] and "unknown" in unknown["detail"]
    reload = client.post("/admin/reload", json={"features": "/etc"}).json()
    assert reload["model_version"] == client.get("/readyz").json()["model_version"]


def test_every_error_status_in_openapi_names_a_body_with_a_code(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def bodies(content: dict[str, Any]) -> list[dict[str, Any]]:
        schema = content["application/json"]["schema"]
        refs = [s["$ref"] for s in schema.get("anyOf", [schema])]
        return [schemas[ref.rsplit("/", 1)[1]] for ref in refs]

    missing = [
        f"{method.upper()} {path} {status}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
        if int(status) >= 400
        for body in bodies(response["content"])
        if "code" not in body.get("required", [])
    ]
    assert missing == []


def test_a_model_that_reads_ages_is_served_each_users_item_times(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """The dataset's times go into the store with the histories, and a stored user's answer
    and explanation read them: the same as their last items posted with those times, not as
    posted without (one visit). No user embedding, so that only the profile makes them."""
    prepared = prepare(world.root, world_features[0])
    config = replace(CONFIG, ages=True, user_embedding=False)
    result = fit(prepared, config, device=torch.device("cpu"), progress=False)
    save_checkpoint(tmp_path / "aged.pt", to_checkpoint(prepared, result, config))
    data = load_dataset(world.root)
    settings = Settings(checkpoint=tmp_path / "aged.pt", features=world_features[0], device="cpu")
    app = create_app(settings, profiles=histories(data), profile_times=history_times(data))
    user = "7"
    recent, ms = timed_recent(histories(data)[user], history_times(data)[user], 9)
    posted = {"history": recent, "k": 20, "exclude_seen": False}
    timed = {"history": recent, "timestamps": [t / 1000 for t in ms]}
    with TestClient(app) as c:
        stored = c.get(f"/recommend/{user}", params={"k": 20, "exclude_seen": "false"}).json()
        as_timed = c.post("/recommend", json={**posted, **timed}).json()
        one_visit = c.post("/recommend", json=posted).json()
        item = stored["items"][0]["item_id"]
        why = c.get(f"/explain/{user}", params={"item_id": item}).json()
        why_timed = c.post(
            "/explain", json={"history": recent, "timestamps": timed["timestamps"], "item_id": item}
        ).json()
    scores = [[x["score"] for x in answer["items"]] for answer in (stored, as_timed, one_visit)]
    assert [x["item_id"] for x in stored["items"]] == [x["item_id"] for x in as_timed["items"]]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4)
    assert not np.allclose(scores[0], scores[2], rtol=1e-4)
    attention = [[p["attention"] for p in w["profile"]] for w in (why, why_timed)]
    np.testing.assert_allclose(attention[0], attention[1], rtol=1e-4, atol=1e-6)


def test_a_published_sasrec_is_served_with_what_it_can_explain(
    world: World,
    world_features: tuple[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Where SASRec wins, `visrec train --model sasrec` gives a checkpoint that `visrec
    publish` publishes and the service runs."""
    ckpt, features = tmp_path / "sasrec.pt", f"--features={world_features[0]}"
    flags = ["--model=sasrec", "--dim=16", "--epochs=20", "--lr=1e-2", "--device=cpu"]
    assert main(["train", str(world.root), features, f"--out={ckpt}", *flags]) == 0
    assert f"checkpoint: {ckpt}" in capsys.readouterr().out
    with redis_prefix("sasrec") as prefix:
        where = {"registry": tmp_path / "registry", "redis_url": REDIS, "redis_prefix": prefix}
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in where.items()]
        assert main(["publish", str(ckpt), features, *flags]) == 0
        found = Registry(tmp_path / "registry", REDIS, prefix).current_files()  # as served
        assert found is not None
        _, served, served_features = found
        settings = Settings(checkpoint=served, features=served_features, device="cpu", **where)
        app = create_app(settings, profiles=histories(load_dataset(world.root)))
        with TestClient(app) as c:
            history = (np.flatnonzero(world.item_kinds == 2) + 1)[:12].tolist()
            top = c.post("/recommend", json={"history": history, "k": 10}).json()["items"]
            kinds = world.item_kinds[np.array([t["item_id"] for t in top]) - 1]
            assert np.mean(kinds == 2) > 0.5  # chance is 0.25: it learnt the runs of one kind
            item = top[0]["item_id"]
            why = c.post("/explain", json={"history": history, "item_id": item}).json()
    assert why["model_version"].endswith(hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12])
    assert [p["item_id"] for p in why["profile"]] == history[-9:]
    assert [p["components"] for p in why["profile"]] == [None] * 9  # it reads no images
    assert sum(p["attention"] for p in why["profile"]) == pytest.approx(1.0, abs=1e-5)
    assert why["score"] == pytest.approx(top[0]["score"], rel=1e-4)


def test_a_stop_ends_when_a_task_ignores_its_cancellation(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background task that swallowed its cancellation (as ``wait_for`` can on Python 3.11,
    and redis-py 8 mid-call) held an app's stop for good: CI's run hung 10 minutes in a
    TestClient's exit. One that lets a cancel go is cancelled again; one that lets every
    cancel go is left behind, named in the log."""
    done: list[str] = []
    # not one of the run's stuck stops (tests/watchdog.py lists those): caplog still sees it
    monkeypatch.setattr(logging.getLogger("visrec.api"), "handlers", [])
    let_go = asyncio.Event()

    async def stubborn() -> None:
        while not let_go.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # every one
                await let_go.wait()

    async def once() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the first only
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    async def polite() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            done.append("polite")

    async def main() -> None:
        tasks = [asyncio.create_task(f(), name=f.__name__) for f in (stubborn, once, polite)]
        try:
            await asyncio.sleep(0)
            await ended(tasks, 0.5, cancel=True)
            assert not tasks[0].done() and tasks[1].cancelled() and tasks[2].cancelled()
        finally:
            let_go.set()  # only so that asyncio.run can close the loop

    with caplog.at_level("ERROR", logger="visrec.api"):
        asyncio.run(main())
    assert done == ["polite"]
    (record,) = caplog.records
    assert record.getMessage().startswith("stubborn had not ended 0.5 s into the stop")
    assert "in stubborn" in record.getMessage()  # where it waits
