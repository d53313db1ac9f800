"""Fault injection: a steady load against a real API and a real Redis while both are killed.

The API (uvicorn, the real app) and a redis-server of its own (AOF, ``appendfsync always``, in a
temporary folder on disk) run on loopback. A fixed rate of ``GET /recommend/{user}`` and
``POST /interactions`` (one event each, with a unique event id) runs throughout, while:

    t = 1/6 of the run   Redis is SIGKILLed          (reads degrade, writes answer 503)
    t = 2/6              Redis restarts on its files (the service recovers by itself)
    t = 1/2              the API is SIGKILLed and restarted at once
    end                  every acknowledged (2xx) interaction is looked up in Redis

It reports requests sent, answers by status code (reads and writes apart, per phase),
acknowledged interactions, interactions found afterwards, and lost ones; it exits with 1 if any
acknowledged interaction is lost or any read answered 5xx.

    .venv/bin/python -m benchmarks.fault_injection [DATA] [--seconds 30] [--rate 90]
    .venv/bin/python -m benchmarks.fault_injection --cost   # events/s per fsync policy

``--cost`` measures what durability costs: for Redis with ``appendfsync always``,
``everysec`` and no AOF, events/s of the store's add script run by ``redis-benchmark`` (Redis
and its disk alone, 1 and 32 clients), and through ``POST /interactions`` (wrk, one event a
request, 16 connections).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from benchmarks.serve_load import wrk
from harness.load import paced
from harness.processes import ApiServer, api_env
from harness.redis_servers import Acked, RedisServer, add_items, found_afterwards
from service.store.profiles import EVENT_TTL_S, MAX_EVENT_IDS
from service.store.redis.profiles import _ADD_LUA, RedisProfileStore

ROOT = Path(__file__).resolve().parents[1]
FSYNC_POLICIES = ("always", "everysec", "off")  # "off": no AOF (nor snapshots) at all


# --------------------------------------------------------------------------- the processes


# --------------------------------------------------------------------------- the load


@dataclass
class Tally:
    answers: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # phase, kind, code
    acked: list[Acked] = field(default_factory=list)
    phase: str = "steady"
    started: float = field(default_factory=time.monotonic)

    def count(self, kind: str, outcome: str) -> None:
        self.answers[(self.phase, kind, outcome)] += 1


async def read(client: httpx.AsyncClient, tally: Tally, user: str) -> None:
    try:
        r = await client.get(f"/recommend/{user}", params={"k": 10})
    except httpx.HTTPError as exc:
        tally.count("read", f"no answer ({type(exc).__name__})")
        return
    degraded = r.status_code == 200 and r.json()["degraded"]
    tally.count("read", f"{r.status_code} degraded" if degraded else str(r.status_code))


async def write(client: httpx.AsyncClient, tally: Tally, event: Acked) -> None:
    body = {"user_id": event.user_id, "item_id": event.item_id, "event_id": event.event_id}
    try:
        r = await client.post("/interactions", json={"events": [body]})
    except httpx.HTTPError as exc:
        tally.count("write", f"no answer ({type(exc).__name__})")
        return
    tally.count("write", str(r.status_code))
    if r.is_success:
        tally.acked.append(event)


async def steady_load(
    url: str,
    tally: Tally,
    stop: asyncio.Event,
    *,
    rate: float,
    users: Sequence[str],
    items: Sequence[int],
) -> None:
    """``rate`` requests a second (two reads for each write) until ``stop`` is set; each
    request is sent on time, whether or not earlier ones were answered."""
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=limits) as client:

        async def request(n: int) -> None:
            if n % 3 == 2:
                await write(client, tally, Acked(rng.choice(users), rng.choice(items), f"fi-{n}"))
            else:
                await read(client, tally, rng.choice(users))

        await paced(rate, stop, request)


async def inject_faults(server: RedisServer, api: ApiServer, tally: Tally, seconds: float) -> None:
    """The faults of the module docstring, in order; the phase names label the answers."""
    step = seconds / 6
    await asyncio.sleep(step)
    tally.phase = "redis killed"
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(step)
    await asyncio.to_thread(server.start)
    tally.phase = "redis back"
    await asyncio.sleep(step)
    tally.phase = "api killed"
    await asyncio.to_thread(api.kill)
    await asyncio.to_thread(api.start)
    tally.phase = "api back"
    await asyncio.sleep(max(step, seconds - (time.monotonic() - tally.started)))


def report(tally: Tally) -> int:
    """Print the answers by kind and code, per phase and in all; returns reads answered 5xx."""
    phases = list(dict.fromkeys(phase for phase, _, _ in tally.answers))
    totals: Counter[tuple[str, str]] = Counter()
    for (_, kind, code), n in tally.answers.items():
        totals[(kind, code)] += n
    print(f"requests sent: {sum(totals.values())}")
    for kind in ("read", "write"):
        print(f"{kind}s, answers by code:")
        for phase in phases:
            codes = sorted(
                (c, n) for (p, k, c), n in tally.answers.items() if (p, k) == (phase, kind)
            )
            print(f"  {phase:13s} " + ", ".join(f"{c}: {n}" for c, n in codes))
        codes = sorted((c, n) for (k, c), n in totals.items() if k == kind)
        print(f"  {'in all':13s} " + ", ".join(f"{c}: {n}" for c, n in codes))
    return sum(n for (k, c), n in totals.items() if k == "read" and c.startswith("5"))


def fault_run(args: argparse.Namespace) -> int:
    """The run of the module docstring; the exit status."""
    from service.offline.bootstrap import histories, prepare_serving

    dataset, features, checkpoint = prepare_serving(args.data, args.work_dir, torch.device("cpu"))
    history = histories(dataset)
    users, items = sorted(history), sorted({i for h in history.values() for i in h})
    prefix = f"fault-{os.getpid()}"
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        server = RedisServer(Path(folder))
        server.start()
        asyncio.run(load_profiles(server.url, prefix, history))
        env = api_env(checkpoint=checkpoint, features=features, redis_url=server.url, prefix=prefix)
        api = ApiServer(env)
        api.start()
        try:
            tally = asyncio.run(faulty_load(server, api, args.seconds, args.rate, users, items))
            time.sleep(0.5)  # the first ping after a restart may still be reconnecting
            ready = httpx.get(f"{api.url}/readyz").json()
            found = found_afterwards(server, prefix, tally.acked)
        finally:
            api.stop()
            server.kill()
    reads_5xx = report(tally)
    lost = len(tally.acked) - found
    print(f"/readyz at the end: degraded {ready['degraded']}, durable {ready['durable']}")
    print(f"acknowledged interactions: {len(tally.acked)}; found afterwards: {found}; lost: {lost}")
    print(f"reads answered 5xx: {reads_5xx}")
    return 1 if lost or reads_5xx else 0


async def load_profiles(url: str, prefix: str, history: dict[str, list[int]]) -> None:
    store = RedisProfileStore.from_url(url, prefix=prefix)
    try:
        await store.load(history)
    finally:
        await store.close()


async def faulty_load(
    server: RedisServer,
    api: ApiServer,
    seconds: float,
    rate: float,
    users: Sequence[str],
    items: Sequence[int],
) -> Tally:
    tally, stop = Tally(), asyncio.Event()
    load = asyncio.create_task(
        steady_load(api.url, tally, stop, rate=rate, users=users, items=items)
    )
    await inject_faults(server, api, tally, seconds)
    stop.set()
    await load
    return tally


# --------------------------------------------------------------------------- the cost


def interactions_lua(items: Sequence[int]) -> str:
    """wrk: one event a request, for 1000 users, each with a new event id."""
    return f"""
local items = {{{",".join(map(str, items))}}}
local headers = {{["Content-Type"] = "application/json"}}
local n = 0
request = function()
  n = n + 1
  local body = string.format(
    '{{"events":[{{"user_id":"u%d","item_id":%d,"event_id":"w%d"}}]}}',
    n % 1000, items[n % #items + 1], n)
  return wrk.format("POST", "/interactions", headers, body)
end
"""


def redis_benchmark(port: int, *, clients: int, requests: int) -> tuple[float, float]:
    """(events/s, p50 ms) of the store's own add script, one event a call, run by Redis's C
    client ``redis-benchmark``: Redis and its disk alone, without Python in the way."""
    keys = [f"cost:{{u:__rand_int__}}:{k}" for k in ("p", "ev", "evp")]
    # max_recent, ttl, now (s, ms), max event ids, then one user's one event: item, event id,
    # no time
    args = ["9", str(EVENT_TTL_S), "1000000000", "1000000000000", str(MAX_EVENT_IDS), "1"]
    args += ["__rand_int__", "e__rand_int__", ""]
    load = ["-q", "-c", str(clients), "-n", str(requests), "-r", "1000000"]
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), *load, "EVAL", _ADD_LUA, "3", *keys, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"([\d.]+) requests per second, p50=([\d.]+) msec", out)
    if found is None:
        raise RuntimeError(f"could not read redis-benchmark's output:\n{out[-500:]}")
    return float(found.group(1)), float(found.group(2))


def cost_run(args: argparse.Namespace) -> int:
    from service.offline.bootstrap import prepare_serving

    dataset, features, checkpoint = prepare_serving(args.data, args.work_dir, torch.device("cpu"))
    items = dataset.item_ids.tolist()
    where = args.work_dir.resolve()
    print(f"{os.cpu_count()} CPUs; Redis files in {where}; wrk for {args.seconds:.0f} s")
    for policy in FSYNC_POLICIES:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
            server = RedisServer(Path(folder), fsync=policy)
            server.start()
            try:
                one = redis_benchmark(server.port, clients=1, requests=3000)
                many = redis_benchmark(server.port, clients=32, requests=30000)
                env = api_env(
                    checkpoint=checkpoint, features=features, redis_url=server.url, prefix="api"
                )
                api = ApiServer(env)
                api.start()
                try:
                    script = interactions_lua(items)
                    http = wrk(api.url, script, connections=16, seconds=int(args.seconds))
                finally:
                    api.stop()
            finally:
                server.kill()
        name = "no AOF" if policy == "off" else f"appendfsync {policy}"
        print(
            f"  {name:21s} Redis alone: {one[0]:6.0f} events/s at 1 client (p50 {one[1]:.2f} ms),"
            f" {many[0]:6.0f} at 32; HTTP: {http.requests_per_s:5.0f} events/s "
            f"(p50 {http.p50_ms:.1f} ms, p99 {http.p99_ms:.1f} ms, {http.errors} errors)"
        )
    return 0


def startup_run(args: argparse.Namespace) -> int:
    """Seconds from starting an API process to its ``/healthz`` and to ``/readyz`` counting
    every added item, and its memory, with Redis holding 0 and each of ``args.startup`` added
    items (random features of the backbone's shape: ~125 KB each with EfficientNet-Lite0):
    stored as ``POST /items`` stores them (with their rows through the model's projection),
    and without those rows (items stored by an earlier version, or a model with another
    projection: the process reads and projects their raw features)."""
    from service.model.checkpoint import read_checkpoint
    from service.model.feature_store import load_features
    from service.offline.bootstrap import prepare_serving

    dataset, features, checkpoint = prepare_serving(None, args.work_dir, torch.device("cpu"))
    _, meta = load_features(features)
    shape = (meta.grid * meta.grid, meta.feature_dim)
    projection = read_checkpoint(checkpoint)[0].feature_map
    first = int(dataset.item_ids.max()) + 1
    print(f"{os.cpu_count()} CPUs; a catalogue of {dataset.n_items} items, added ones {shape}")
    for count, kept in [(0, True), *((n, k) for n in args.startup for k in (True, False))]:
        prefix = f"startup-{os.getpid()}-{count}"
        with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
            server = RedisServer(Path(folder), fsync="off")
            server.start()
            try:
                ids = range(first, first + count)
                add_items(server.url, prefix, ids, shape, projection if kept else None)
                client = server.client()
                stored = sum(client.memory_usage(k) or 0 for k in client.scan_iter(f"{prefix}:*"))
                env = api_env(
                    checkpoint=checkpoint, features=features, redis_url=server.url, prefix=prefix
                )
                api = ApiServer(env)
                t0 = time.monotonic()
                api.start(timeout_s=1800)
                healthy = time.monotonic() - t0
                while (ready := _ready_items(api.url)) < dataset.n_items + count:
                    if time.monotonic() - t0 > 1800:
                        raise RuntimeError(f"{ready} items served after 30 min")
                    time.sleep(0.1)
                complete = time.monotonic() - t0
                assert api.proc is not None
                time.sleep(5)  # the background read of their features
                rss = _rss_mib(api.proc.pid)
                api.stop()
            finally:
                server.kill()
        rows = "rows kept" if kept else "no rows  "
        print(
            f"  {count:6d} added items, {rows} ({stored / 2**20:7.0f} MiB in Redis): /healthz "
            f"after {healthy:6.1f} s, every item served after {complete:6.1f} s, {rss:6.0f} MiB "
            "RSS 5 s later"
        )
    return 0


def _ready_items(url: str) -> int:
    return int(httpx.get(f"{url}/readyz", timeout=5).json()["items"])


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=90.0, help="requests/s, 2 reads a write")
    parser.add_argument("--cost", action="store_true", help="events/s per fsync policy instead")
    parser.add_argument(
        "--startup",
        type=lambda s: [int(n) for n in s.split(",")],
        help="start-up time with Redis holding these numbers of added items, e.g. 1000,10000",
    )
    args = parser.parse_args()
    if args.cost:
        args.seconds = min(args.seconds, 5.0)
    if args.startup:
        sys.exit(startup_run(args))
    sys.exit(cost_run(args) if args.cost else fault_run(args))


if __name__ == "__main__":
    main()
