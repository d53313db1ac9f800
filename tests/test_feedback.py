"""What users did with the answers: request ids, POST /feedback and its counts (issue 25)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from harness.processes import free_port
from service.abtest import wilson
from service.api.app import create_app
from service.config import Settings
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.store.feedback import Answer, MemoryFeedback, NotInAnswer, UnknownAnswer

REDIS = "redis://127.0.0.1:6379/0"
WRITER = "writer-key"


def _settings(world: World, work: Path, features: Path, **extra: object) -> Settings:
    return Settings(
        checkpoint=work / world.root.resolve().name / "acf.pt",
        features=features,
        device="cpu",
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module", params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, object]]:
    """Where answers are kept: this process, or Redis (a prefix of its own, removed after)."""
    if request.param == "memory":
        yield {}
        return
    prefix = f"test-feedback-{uuid.uuid4().hex}"
    yield {"redis_url": REDIS, "redis_prefix": prefix}
    with Redis.from_url(REDIS) as redis:
        for key in redis.scan_iter(f"{prefix}:*", count=1000):
            redis.delete(key)


@pytest.fixture(scope="module")
def client(
    store: dict[str, object],
    world: World,
    world_features: tuple[Path, np.ndarray],
    served_work_dir: Path,
) -> Iterator[TestClient]:
    settings = _settings(world, served_work_dir, world_features[0], **store)
    app = create_app(settings, profiles=histories(load_dataset(world.root)))
    with TestClient(app) as c:
        yield c


def _answer(client: TestClient, user: str, k: int = 10) -> tuple[str, list[int], str]:
    body = client.get(f"/recommend/{user}", params={"k": k}).json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"]) and body["arm"] is None
    return body["request_id"], [i["item_id"] for i in body["items"]], body["model_version"]


def _totals(client: TestClient, version: str) -> dict[str, object]:
    (row,) = [t for t in client.get("/feedback").json() if t["model_version"] == version]
    return row


def test_each_impression_and_click_counts_once_and_a_click_is_an_interaction(
    client: TestClient,
) -> None:
    before = {t["model_version"]: t for t in client.get("/feedback").json()}
    request_id, items, version = _answer(client, "7")
    body = {"request_id": request_id, "impressions": items[:5], "clicks": [items[2], items[7]]}
    first = client.post("/feedback", json=body).json()
    # the click at rank 8 was shown too, though not listed among the impressions
    assert (first["impressions"], first["clicks"], first["applied"]) == (6, 2, 2)
    assert first["model_version"] == version and first["arm"] is None
    again = client.post("/feedback", json=body).json()  # a retry, or a double send
    assert (again["impressions"], again["clicks"], again["applied"]) == (0, 0, 0)
    # the clicked items are now the user's: seen, so no longer recommended
    _, after, _ = _answer(client, "7", k=20)
    assert items[2] not in after and items[7] not in after
    totals = _totals(client, version)
    earlier = before.get(version, {"impressions": 0, "clicks": 0})
    assert totals["impressions"] == earlier["impressions"] + 6  # type: ignore[operator]
    assert totals["clicks"] == earlier["clicks"] + 2  # type: ignore[operator]
    assert {"3", "8"} <= set(totals["clicks_by_rank"])  # type: ignore[arg-type]
    low, high = totals["ctr_95"]  # type: ignore[misc]
    assert low <= totals["ctr"] <= high  # type: ignore[operator]
    metrics = client.get("/metrics").text
    assert f'visrec_feedback_clicks_total{{arm="none",rank="8",version="{version}"}}' in metrics


def test_feedback_on_an_unknown_answer_or_items_it_did_not_hold_counts_nothing(
    client: TestClient,
) -> None:
    unknown = client.post("/feedback", json={"request_id": uuid.uuid4().hex, "clicks": [1]})
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_request"
    request_id, items, _ = _answer(client, "8")
    stranger = next(i for i in range(1, 1000) if i not in items)
    refused = client.post(
        "/feedback", json={"request_id": request_id, "impressions": [*items[:3], stranger]}
    )
    assert refused.status_code == 422 and refused.json()["code"] == "items_not_in_answer"
    assert refused.json()["items"] == [stranger]
    counted = client.post("/feedback", json={"request_id": request_id, "impressions": items[:3]})
    assert counted.json()["impressions"] == 3  # the refused call counted none of them


def test_an_answer_to_a_history_counts_clicks_without_a_user_to_add_them_to(
    client: TestClient,
) -> None:
    body = client.post("/recommend", json={"history": [1, 2, 3], "k": 5}).json()
    clicked = body["items"][0]["item_id"]
    answer = client.post("/feedback", json={"request_id": body["request_id"], "clicks": [clicked]})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["clicks"], answer.json()["applied"]) == (1, 0)


def test_replicas_count_feedback_on_each_others_answers_once(
    world: World, world_features: tuple[Path, np.ndarray], served_work_dir: Path
) -> None:
    """Two processes sharing Redis; the same click sent 16 times at once, to both."""
    prefix = f"test-feedback-{uuid.uuid4().hex}"
    shared = {"redis_url": REDIS, "redis_prefix": prefix}
    settings = _settings(world, served_work_dir, world_features[0], **shared)
    try:
        with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
            body = a.post("/recommend", json={"history": [1, 2], "k": 5}).json()
            click = {"request_id": body["request_id"], "clicks": [body["items"][1]["item_id"]]}
            with ThreadPoolExecutor(8) as pool:
                sent = list(pool.map(lambda c: c.post("/feedback", json=click), [a, b] * 8))
            assert all(r.status_code == 200 for r in sent)
            assert sum(r.json()["clicks"] for r in sent) == 1
            assert sum(r.json()["impressions"] for r in sent) == 1
            for replica in (a, b):
                totals = _totals(replica, body["model_version"])
                assert (totals["impressions"], totals["clicks"]) == (1, 1)
                assert totals["clicks_by_rank"] == {"2": 1}
        with Redis.from_url(REDIS) as redis:
            key = f"{prefix}:{{feedback}}:answer:{body['request_id']}"
            assert 0 < redis.ttl(key) <= 3600  # kept for the window, not for good
    finally:
        with Redis.from_url(REDIS) as redis:
            for key in redis.scan_iter(f"{prefix}:*", count=1000):
                redis.delete(key)


def test_with_feedback_off_answers_have_no_request_id(
    world: World, world_features: tuple[Path, np.ndarray], served_work_dir: Path
) -> None:
    settings = _settings(world, served_work_dir, world_features[0], feedback_window_s=0)
    with TestClient(create_app(settings)) as c:
        body = c.post("/recommend", json={"history": [1], "k": 3}).json()
        assert body["request_id"] is None
        refused = c.post("/feedback", json={"request_id": uuid.uuid4().hex, "clicks": [1]})
        assert refused.status_code == 404 and refused.json()["code"] == "feedback_off"


def test_the_memory_log_forgets_answers_past_the_window_or_its_bound() -> None:
    now = [1000.0]
    log = MemoryFeedback(window_s=60, max_answers=2, clock=lambda: now[0])
    answer = Answer("v1", "", "u", (5, 6, 7))

    async def run() -> None:
        for name in ("a", "b", "c"):
            await log.remember(name, answer)
        with pytest.raises(UnknownAnswer):  # the oldest, beyond the bound
            await log.count("a", [5], [])
        with pytest.raises(NotInAnswer):
            await log.count("b", [5, 9], [])
        counted = await log.count("b", [5], [7, 7])
        assert counted.impressions == (5, 7) and counted.clicks == ((7, 3),)
        now[0] += 61
        with pytest.raises(UnknownAnswer):  # past the window
            await log.count("c", [5], [])
        totals = await log.totals()
        assert (totals["v1", ""].impressions, totals["v1", ""].clicks) == (2, 1)
        assert totals["v1", ""].by_rank == {3: 1}

    asyncio.run(run())


@pytest.mark.parametrize(("clicks", "shown"), [(0, 10), (5, 10), (1, 1000), (999, 1000)])
def test_the_ctr_interval_holds_the_rate_and_stays_in_bounds(clicks: int, shown: int) -> None:
    low, high = wilson(clicks, shown)
    assert 0.0 <= low <= clicks / shown <= high <= 1.0
    known = {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634)}  # published Wilson bounds
    if (clicks, shown) in known:
        assert (low, high) == pytest.approx(known[clicks, shown], abs=1e-4)
    else:
        assert high - low < 0.01  # narrows with the impressions


def test_feedback_while_redis_cannot_answer_is_a_503_to_retry(
    world: World, world_features: tuple[Path, np.ndarray], served_work_dir: Path
) -> None:
    down = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_prefix": "nowhere"}
    settings = _settings(world, served_work_dir, world_features[0], **down)
    with TestClient(create_app(settings)) as c:
        refused = c.post("/feedback", json={"request_id": uuid.uuid4().hex, "clicks": [1]})
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    body = refused.json()
    assert body["code"] == "store_unavailable" and "feedback store" in body["detail"]
    assert body["nothing_applied"] is True  # never reached: nothing counted
