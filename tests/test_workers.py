"""`visrec-serve --workers N`: one port, N processes forked from one that loaded the model,
profiles in Redis. Every worker answers, a write through one is read through any other, a
worker that dies is replaced, and SIGTERM stops them all cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.processes import SERVE, call, children, free_port, read_back, wait_for
from harness.redis_servers import REDIS, redis_prefix
from service.offline.data.synthetic import World


def _processes(url: str, asks: int = 60) -> set[int]:
    return {call(f"{url}/readyz")["process"] for _ in range(asks)}


@pytest.fixture
def server(world: World, served_work_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with redis_prefix("workers") as prefix:
        yield from _serve(world, served_work_dir, prefix)


def _serve(
    world: World, served_work_dir: Path, prefix: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "VISREC_REDIS_URL": REDIS,
        "VISREC_REDIS_PREFIX": prefix,
        "VISREC_ENVIRONMENT": "development",
    }
    command = [SERVE, str(world.root), "--work-dir", str(served_work_dir), "--workers", "2"]
    proc = subprocess.Popen([*command, "--port", str(port), "--load-profiles"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/readyz", [proc])
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()  # its workers follow it (PR_SET_PDEATHSIG)
            proc.wait()


def test_every_worker_answers_reads_what_another_wrote_and_dies_with_the_parent(
    server: tuple[str, subprocess.Popen[bytes]], world: World
) -> None:
    url, proc = server
    workers = _processes(url)
    assert len(workers) == 2 and workers == set(children(proc.pid))
    item = int(world.item_kinds.size)  # the last item; user 0 has not seen it all
    for attempt in range(10):  # each write and read on a new connection, any worker
        call(f"{url}/interactions", {"events": [{"user_id": "0", "item_id": item - attempt}]})
        why = read_back(f"{url}/explain/0?item_id=1")
        assert why["profile"][-1]["item_id"] == item - attempt
    proc.kill()  # even a parent killed outright takes its workers with it
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(
    server: tuple[str, subprocess.Popen[bytes]], world: World
) -> None:
    url, proc = server
    before = _processes(url)
    item = int(world.item_kinds.size)  # the last item; user 0 has not seen it all
    event = {"events": [{"user_id": "0", "item_id": item, "event_id": "live-1"}]}
    assert call(f"{url}/interactions", event)["applied"] == 1
    for victim in sorted(before):  # worker 0, which has the histories, and the other
        os.kill(victim, signal.SIGKILL)
        _replaced(url, proc, victim)
    answering = _processes(url)
    assert not answering & before and len(answering) == 2
    # The replacement of worker 0 loaded the histories over the live profiles: the event was
    # gone, and so was its id (a retry was applied again).
    assert read_back(f"{url}/explain/0?item_id=1")["profile"][-1]["item_id"] == item
    assert call(f"{url}/interactions", event)["applied"] == 0
    workers = set(children(proc.pid))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def _replaced(url: str, proc: subprocess.Popen[bytes], victim: int) -> None:
    """Wait until ``victim``'s replacement answers beside the other worker."""
    others = set(children(proc.pid)) - {victim}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = set(children(proc.pid))
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    wait_for(f"{url}/readyz", [proc])
    answering: set[int] = set()
    while len(answering) < 2 and time.monotonic() < deadline:
        answering |= _processes(url, asks=10)
    assert victim not in answering and len(answering) == 2
    assert others <= answering  # the other one was left alone


@pytest.mark.parametrize(
    ("flags", "workers", "refusal"),
    [
        (["--workers", "2"], None, "--workers 2 needs VISREC_REDIS_URL"),
        ([], "2", "--workers 2 needs VISREC_REDIS_URL"),  # read through the settings
        ([], "0", "VISREC_WORKERS: Input should be greater than or equal to 1"),
    ],
)
def test_several_workers_need_redis(
    world: World, served_work_dir: Path, flags: list[str], workers: str | None, refusal: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VISREC_REDIS_URL", "VISREC_WORKERS")}
    if workers is not None:
        env["VISREC_WORKERS"] = workers
    done = subprocess.run(
        [SERVE, str(world.root), "--work-dir", str(served_work_dir), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert refusal in done.stderr
