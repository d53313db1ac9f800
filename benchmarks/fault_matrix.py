"""The fault matrix: every fault against every deployment, under a steady load.

Each cell starts afresh: a redis-server of its own (AOF, ``appendfsync always``, files in a
temporary folder) and real ``visrec-serve`` processes on the synthetic world, the first with
``--load-profiles``:

    1 process    one process
    2 workers    ``--workers 2``: one port, two processes forked from one parent
    3 replicas   three processes behind a real HAProxy (``docker/haproxy.cfg``)

and one fault, at a third of the run:

    redis-kill   Redis SIGKILLed, restarted on its files 3 s later
    flushall     ``FLUSHALL``: Redis is back at once, empty
    redis-down   Redis is down when the service starts, and started at a third of the run
    process-kill one process SIGKILLed: the process (started again), a worker (its parent
                 replaces it), or a replica (started again)
    added-items  Redis holds ``--added-items`` items (as ``POST /items`` stores them, random
                 features) when the processes start: a restart, or a new replica, once many
                 items were added; "recovered" is then the seconds from starting them to the
                 last one answering with every item (its lifespan loads them all first)

The load: ``--rate`` requests a second, two ``GET /recommend/{user}`` for each ``POST
/interactions`` of one event with an event id of its own. A write that is not answered, or is
answered 5xx, is sent again with the same event id every 0.25 s until it is answered 2xx, as
the API tells a client to do. Per cell it prints:

    acked        events answered 2xx
    lost         acked events not in Redis at the end (the user's event log and profile),
                 and of them those acked after the fault's end
    double       events whose answers' ``applied`` add up to more than 1 (applied twice)
    recovered    seconds from the fault's end (Redis back, or the process killed) to the last
                 request that failed (not answered, 5xx, or a degraded read); 0: none failed
    /readyz      sampled every 0.5 s through the load's address: how often it said degraded
                 while Redis was down (true), and said so 5 s after the fault ended (false)

The goal (issue 22): 0 lost, 0 double, recovered within 5 s, /readyz true to the facts.
``benchmarks/fault_injection.py --startup`` measures one process's start-up at several item
counts, and its memory.

    .venv/bin/python -m benchmarks.fault_matrix [--seconds 15] [--rate 60]
        [--deployments 1,2,3] [--faults redis-kill,flushall,redis-down,process-kill,added-items]
        [--added-items 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from harness.load import paced
from harness.processes import SERVE, children, free_port, wait_for
from harness.redis_servers import Acked, RedisServer, add_items, found_afterwards
from service.model.projection import Projection

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = "/usr/sbin/haproxy"
DEPLOYMENTS = {"1": "1 process", "2": "2 workers", "3": "3 replicas"}
FAULTS = ("redis-kill", "flushall", "redis-down", "process-kill", "added-items")
REDIS_DOWN_S = 3.0  # how long redis-kill keeps Redis down
RETRY_S = 0.25
SETTLE_S = 5.0  # the goal: back to full service within this long of the fault's end


# --------------------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    """``visrec-serve`` processes of one kind over one Redis; ``url`` is where clients go."""

    kind: str  # a DEPLOYMENTS key
    world: Path
    work: Path
    redis_url: str
    prefix: str
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    lb_port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        port = self.lb_port if self.kind == "3" else self.ports[0]
        return f"http://127.0.0.1:{port}"

    def start(self) -> None:
        """Every process, answering ``/healthz`` (``/readyz`` may say degraded: Redis may be
        down), and the load balancer for replicas."""
        count = 3 if self.kind == "3" else 1
        self.ports = [free_port() for _ in range(count)]
        self.procs = [self._serve(i) for i in range(count)]
        for port in self.ports:
            wait_for(f"http://127.0.0.1:{port}/healthz", self.procs, timeout_s=600)
        if self.kind == "3":
            lb_env = {
                **os.environ,
                "LB_BIND": f"127.0.0.1:{self.lb_port}",
                **{f"REPLICA_{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(self.ports)},
            }
            self.haproxy = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(ROOT / "docker" / "haproxy.cfg")],
                env=lb_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for(f"{self.url}/healthz", [*self.procs, self.haproxy])
            time.sleep(1.5)  # every replica's health check has passed (rise 2, every 0.5 s)

    def _serve(self, i: int) -> subprocess.Popen[bytes]:
        command = [SERVE, str(self.world), "--work-dir", str(self.work)]
        command += ["--port", str(self.ports[i])]
        command += ["--load-profiles"] if i == 0 else []
        command += ["--workers", "2"] if self.kind == "2" else []
        env = {
            **os.environ,
            "VISREC_REDIS_URL": self.redis_url,
            "VISREC_REDIS_PREFIX": self.prefix,
            "VISREC_ENVIRONMENT": "development",
            "VISREC_RATE_LIMIT_PER_S": "0",
        }
        return subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)

    def kill_one(self) -> None:
        """SIGKILL the process (started again), one worker (its parent replaces it) or the
        second replica (started again; HAProxy routes around it meanwhile)."""
        if self.kind == "2":
            os.kill(children(self.procs[0].pid)[0], signal.SIGKILL)
            return
        i = 1 if self.kind == "3" else 0
        self.procs[i].kill()
        self.procs[i].wait()
        self.procs[i] = self._serve(i)

    def stop(self) -> None:
        for proc in [*self.procs, *([self.haproxy] if self.haproxy else [])]:
            proc.terminate()
        for proc in [*self.procs, *([self.haproxy] if self.haproxy else [])]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- the load


@dataclass
class Cell:
    acked: list[Acked] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)  # monotonic, as ``acked``
    applied: dict[str, int] = field(default_factory=dict)  # event id -> sum of `applied`
    failures: list[float] = field(default_factory=list)  # monotonic times of failed requests
    readyz: list[tuple[float, bool]] = field(default_factory=list)  # (time, degraded)
    fault_start: float = 0.0  # when the fault began (monotonic)
    fault_end: float = 0.0  # when Redis was back, or the process killed
    redis_down: tuple[float, float] | None = None  # while Redis did not answer
    requests: int = 0


async def _read(client: httpx.AsyncClient, cell: Cell, user: str) -> None:
    cell.requests += 1
    try:
        r = await client.get(f"/recommend/{user}", params={"k": 10})
        failed = r.status_code >= 500 or (r.status_code == 200 and r.json()["degraded"])
    except httpx.HTTPError:
        failed = True
    if failed:
        cell.failures.append(time.monotonic())


async def _write(client: httpx.AsyncClient, cell: Cell, event: Acked, give_up: float) -> None:
    body = {"events": [{"user_id": event.user_id, "item_id": event.item_id,
                        "event_id": event.event_id}]}  # fmt: skip
    while time.monotonic() < give_up:
        cell.requests += 1
        try:
            r = await client.post("/interactions", json=body)
        except httpx.HTTPError:
            r = None
        if r is not None and r.is_success:
            cell.applied[event.event_id] = cell.applied.get(event.event_id, 0) + r.json()["applied"]
            cell.acked.append(event)
            cell.acked_at.append(time.monotonic())
            return
        if r is not None and r.status_code < 500:
            raise RuntimeError(f"a write was refused: {r.status_code} {r.text}")
        cell.failures.append(time.monotonic())
        await asyncio.sleep(RETRY_S)


async def _sample_readyz(client: httpx.AsyncClient, cell: Cell, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            r = await client.get("/readyz")
            cell.readyz.append((time.monotonic(), bool(r.json()["degraded"])))
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.5)


async def _load(
    url: str,
    cell: Cell,
    stop: asyncio.Event,
    *,
    rate: float,
    users: Sequence[str],
    items: Sequence[int],
) -> None:
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=limits) as client:

        async def request(n: int) -> None:
            if n % 3 == 2:
                event = Acked(rng.choice(users), rng.choice(items), f"fm-{n}")
                await _write(client, cell, event, time.monotonic() + 60)
            else:
                await _read(client, cell, rng.choice(users))

        await asyncio.gather(_sample_readyz(client, cell, stop), paced(rate, stop, request))


async def _inject(
    fault: str, redis: RedisServer, deployment: Deployment, cell: Cell, at: float
) -> None:
    await asyncio.sleep(at)
    cell.fault_start = time.monotonic()
    if fault == "redis-kill":
        await asyncio.to_thread(redis.kill)
        await asyncio.sleep(REDIS_DOWN_S)
        await asyncio.to_thread(redis.start)
        cell.redis_down = (cell.fault_start, time.monotonic())
    elif fault == "flushall":
        await asyncio.to_thread(lambda: redis.client().flushall())
    elif fault == "redis-down":
        await asyncio.to_thread(redis.start)
        cell.redis_down = (0.0, time.monotonic())
    elif fault == "process-kill":
        await asyncio.to_thread(deployment.kill_one)
    cell.fault_end = time.monotonic()


async def _run_cell(
    fault: str,
    redis: RedisServer,
    deployment: Deployment,
    seconds: float,
    rate: float,
    users: Sequence[str],
    items: Sequence[int],
) -> Cell:
    """The load for ``seconds``, the fault at a third of them; the load goes on at least
    ``SETTLE_S`` + 2 s after the fault's end."""
    cell, stop, started = Cell(), asyncio.Event(), time.monotonic()
    load = asyncio.create_task(
        _load(deployment.url, cell, stop, rate=rate, users=users, items=items)
    )
    await _inject(fault, redis, deployment, cell, seconds / 3)
    end = max(started + seconds, cell.fault_end + SETTLE_S + 2)
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    stop.set()
    await load
    return cell


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Outcome:
    deployment: str
    fault: str
    requests: int
    acked: int
    lost: int
    lost_after: int  # of those acked after the fault's end
    double: int
    recovered_s: float
    # shares of /readyz samples saying degraded: while Redis was down (None: it never was),
    # and SETTLE_S after the fault's end; nan: no sample
    readyz_down: float | None
    readyz_after: float

    @property
    def met(self) -> bool:
        return (
            self.lost == 0
            and self.double == 0
            and self.recovered_s <= SETTLE_S
            and self.readyz_after == 0.0
            and (self.readyz_down is None or self.readyz_down == 1.0)
        )


def run_cell(
    kind: str,
    fault: str,
    world: Path,
    work: Path,
    *,
    seconds: float,
    rate: float,
    added: int,
    item_shape: tuple[int, int],
    projection: Projection | None,
) -> Outcome:
    """One cell; ``added`` items of ``item_shape`` (K, C) features in Redis at start for the
    added-items fault, as ``POST /items`` to a model with ``projection`` stores them."""
    from service.offline.data.dataset import load_dataset

    dataset = load_dataset(world, check_images=False)
    users = [str(u) for u in dataset.user_ids.tolist()]
    items = dataset.item_ids.tolist()
    prefix = f"matrix-{os.getpid()}-{kind}-{fault}"
    with tempfile.TemporaryDirectory(dir=work) as folder:
        redis = RedisServer(Path(folder))
        if fault != "redis-down":
            redis.start()
        deployment = Deployment(kind, world, work, redis.url, prefix)
        try:
            if fault == "added-items":
                first = max(items) + 1
                add_items(redis.url, prefix, range(first, first + added), item_shape, projection)
            started = time.monotonic()
            deployment.start()
            startup = time.monotonic() - started
            if fault == "added-items":
                served = httpx.get(f"{deployment.url}/readyz", timeout=10).json()["items"]
                assert served == len(items) + added, f"{served} items served"
            cell = asyncio.run(_run_cell(fault, redis, deployment, seconds, rate, users, items))
            found = found_afterwards(redis, prefix, cell.acked)
            after = [
                e for e, t in zip(cell.acked, cell.acked_at, strict=True) if t > cell.fault_end
            ]
            found_after = found_afterwards(redis, prefix, after)
        finally:
            deployment.stop()
            redis.kill()
    late = [t for t in cell.failures if t > cell.fault_end]
    down = cell.redis_down
    said_down = [d for t, d in cell.readyz if down and down[0] + 1 < t < down[1]]
    said_after = [d for t, d in cell.readyz if t > cell.fault_end + SETTLE_S]
    return Outcome(
        DEPLOYMENTS[kind],
        fault,
        cell.requests,
        len(cell.acked),
        len(cell.acked) - found,
        len(after) - found_after,
        sum(n > 1 for n in cell.applied.values()),
        max(
            startup if fault == "added-items" else 0.0, max(late) - cell.fault_end if late else 0.0
        ),
        _share(said_down) if down else None,
        _share(said_after),
    )


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def _percent(share: float | None) -> str:
    """As the table shows a share: "—" where it does not apply, else a percentage that reads
    as 0% or 100% only when it is exactly that."""
    if share is None:
        return "—"
    if math.isnan(share):
        return "no sample"
    if share in (0.0, 1.0):
        return f"{share:.0%}"
    return f"{min(max(share, 0.001), 0.999):.1%}"


def print_table(outcomes: Sequence[Outcome]) -> None:
    print(
        "| deployment | fault | requests | acked | lost (acked after the fault) | double "
        "| recovered (s) "
        "| /readyz degraded while Redis down | /readyz degraded 5 s after | goal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        print(
            f"| {o.deployment} | {o.fault} | {o.requests} | {o.acked} | {o.lost} "
            f"({o.lost_after}) | {o.double} "
            f"| {o.recovered_s:.1f} | {_percent(o.readyz_down)} | {_percent(o.readyz_after)} "
            f"| {'met' if o.met else '**not met**'} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--seconds", type=float, default=15.0, help="of load per cell")
    parser.add_argument("--rate", type=float, default=60.0, help="requests/s, 2 reads a write")
    parser.add_argument("--deployments", default="1,2,3", help="of 1 (process), 2 (workers), 3")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument(
        "--added-items", type=int, default=10_000, help="in Redis at start (added-items)"
    )
    args = parser.parse_args()
    from service.model.checkpoint import read_checkpoint
    from service.model.feature_store import load_features
    from service.offline.bootstrap import prepare_serving

    dataset, features, checkpoint = prepare_serving(None, args.work_dir, torch.device("cpu"))
    world = dataset.root
    _, meta = load_features(features)
    item_shape = (meta.grid * meta.grid, meta.feature_dim)  # what added items hold
    projection = read_checkpoint(checkpoint)[0].feature_map  # what the service projects them by
    print(f"{os.cpu_count()} CPUs; the synthetic world ({dataset.n_users} users); "
          f"{args.seconds:.0f} s of load at {args.rate:.0f} requests/s per cell")  # fmt: skip
    outcomes = []
    for kind in args.deployments.split(","):
        for fault in args.faults.split(","):
            t0 = time.monotonic()
            outcomes.append(
                run_cell(
                    kind,
                    fault,
                    world,
                    args.work_dir,
                    seconds=args.seconds,
                    rate=args.rate,
                    added=args.added_items,
                    item_shape=item_shape,
                    projection=projection,
                )
            )
            o = outcomes[-1]
            print(f"  {o.deployment}, {o.fault}: {time.monotonic() - t0:.0f} s", flush=True)
    print_table(outcomes)
    sys.exit(0 if all(o.met for o in outcomes) else 1)


if __name__ == "__main__":
    main()
