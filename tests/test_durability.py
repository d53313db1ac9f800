"""An acknowledged interaction survives SIGKILL of the API and of Redis, both at once.

A real API process (uvicorn) and a redis-server of the test's own, with its files in a temporary
folder, take concurrent writes; as soon as enough are acknowledged (2xx), both processes are
SIGKILLed with writes still in flight. Redis restarts on its files, and every acknowledged
interaction must be there: the event id in the user's event log and the item in the profile.

The same run against a Redis without AOF loses them all: the check can fail. A process kill
does not tell ``appendfsync always`` from ``everysec`` (what Redis has written is in the page
cache either way); only a crash of the machine does, which a test cannot cause here.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness.catalogues import Catalogue, synthetic_catalogue
from harness.processes import ApiServer, api_env
from harness.redis_servers import Acked, RedisServer, found_afterwards
from service.store.redis.profiles import RedisProfileStore

WRITERS = 8
ACKED_BEFORE_KILL = 150


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    return synthetic_catalogue(200, tmp_path_factory.mktemp("catalogue"), n_users=100, dim=16)


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, fsync=request.param)
    server.start()
    yield server
    server.kill()


def events(writer: int, n: int) -> list[Acked]:
    """The ``n``-th request of a writer: one or two events (two users), each with its own id."""
    return [
        Acked(f"user-{(writer * 7 + n + k) % 50}", 1 + (n * 13 + k) % 200, f"w{writer}-{n}-{k}")
        for k in range(1 + n % 2)
    ]


def write_until(url: str, stop: threading.Event, acked: list[Acked], writer: int) -> None:
    """One writer, request after request, until ``stop`` or the API is gone."""
    with httpx.Client(base_url=url, timeout=5) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            batch = events(writer, n)
            body = [
                {"user_id": e.user_id, "item_id": e.item_id, "event_id": e.event_id} for e in batch
            ]
            try:
                r = client.post("/interactions", json={"events": body})
            except httpx.HTTPError:
                return  # the API was killed mid-request: not acknowledged
            if r.is_success:
                acked.extend(batch)  # list.extend is atomic under the GIL


@pytest.mark.parametrize(
    ("server", "kept"), [("always", True), ("off", False)], indirect=["server"]
)
def test_acknowledged_interactions_survive_sigkill_of_api_and_redis(
    catalogue: Catalogue, server: RedisServer, kept: bool
) -> None:
    prefix = f"test-durability-{uuid.uuid4().hex[:8]}"
    settings = catalogue.settings
    env = api_env(
        checkpoint=settings.checkpoint,
        features=settings.features,
        redis_url=server.url,
        prefix=prefix,
    )
    api = ApiServer(env)
    api.start()
    acked: list[Acked] = []
    stop = threading.Event()
    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            writers = [pool.submit(write_until, api.url, stop, acked, w) for w in range(WRITERS)]
            while len(acked) < ACKED_BEFORE_KILL and not any(w.done() for w in writers):
                stop.wait(0.005)
            server.kill()  # writes still in flight, neither process told
            api.kill()
            stop.set()
            for w in writers:
                w.result()
    finally:
        stop.set()
        api.kill()
    assert len(acked) >= ACKED_BEFORE_KILL

    server.start()  # on the same files
    found = found_afterwards(server, prefix, acked)
    if kept:
        assert found == len(acked)
        assert asyncio.run(durable(server.url)) is True
    else:
        assert found == 0  # no AOF: Redis came back empty
        assert asyncio.run(durable(server.url)) is False


async def durable(url: str) -> bool | None:
    store = RedisProfileStore.from_url(url)
    try:
        return await store.durable()
    finally:
        await store.close()
