"""`visrec-serve --workers N` against one worker: memory per process, reads, and the soak.

For each worker count, the real entry point serves DATA with its profiles in Redis (the local
server, a prefix of its own) and the rate limiter off (wrk is one client): each process's RSS
and PSS (its share of pages shared with the others: the model loaded once before the fork),
then ``GET /recommend/{user}?k=20`` at 64 connections; with the most workers, the 90/10
read/write soak of ``benchmarks/soak.py`` at ``--rate`` for ``--minutes``. One run, one
machine, one after the other.

    .venv/bin/python benchmarks/workers.py [DATA] [--workers 1 2] [--minutes 5] [--rate 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid
from pathlib import Path

import redis
from serve_load import recommend_script, wrk
from soak import mixed_script

from harness.processes import children, free_port, wait_for
from harness.redis_servers import REDIS
from service.offline.data.dataset import load_dataset


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) / 1024
    return fields["Rss"], fields["Pss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=int, default=15, help="per read measurement")
    parser.add_argument("--minutes", type=float, default=5.0, help="soak; 0 skips it")
    parser.add_argument("--rate", type=float, default=1000.0, help="soak's offer (0: unpaced)")
    parser.add_argument("--connections", type=int, default=32, help="soak connections")
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    users = [str(u) for u in dataset.user_ids.tolist()]
    items = [int(i) for i in dataset.item_ids.tolist()]
    serve = Path(sys.executable).parent / "visrec-serve"
    print(f"visrec-serve {args.data} --workers N, Redis store, on {os.cpu_count()} CPUs")
    reads: dict[int, float] = {}
    for n in args.workers:
        prefix = f"bench-workers-{uuid.uuid4().hex[:8]}"
        port = free_port()
        env = {
            **os.environ,
            "VISREC_REDIS_URL": REDIS,
            "VISREC_REDIS_PREFIX": prefix,
            "VISREC_ENVIRONMENT": "development",
            "VISREC_RATE_LIMIT_PER_S": "0",
        }
        command = [str(serve), str(args.data), "--work-dir", str(args.work_dir)]
        proc = subprocess.Popen(
            [*command, "--workers", str(n), "--port", str(port), "--load-profiles"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{url}/healthz", [proc], timeout_s=300)
            wrk(url, recommend_script(users), connections=16, seconds=3)  # warm-up
            procs = [proc.pid] if n == 1 else [proc.pid, *children(proc.pid)]
            mem = ", ".join(
                f"{'parent' if p == proc.pid and n > 1 else 'worker'} {p}: RSS {r:.0f} MiB, "
                f"PSS {s:.0f} MiB"
                for p in procs
                for r, s in [memory_mib(p)]
            )
            print(f"{n} worker(s): {mem}")
            load = wrk(url, recommend_script(users), connections=64, seconds=args.seconds)
            reads[n] = load.requests_per_s
            print(
                f"{n} worker(s): reads at 64 connections {load.requests_per_s:.0f} req/s "
                f"({load.requests_per_s / reads[args.workers[0]]:.2f}x), p50 {load.p50_ms:.1f} "
                f"ms, p99 {load.p99_ms:.1f} ms, {load.errors} errors"
            )
            if n == max(args.workers) and args.minutes:
                offered = f"offering {args.rate:.0f} req/s" if args.rate else "unpaced"
                script = mixed_script(users, items, rate=args.rate, connections=args.connections)
                soak = wrk(
                    url, script, connections=args.connections, seconds=round(args.minutes * 60)
                )
                rss = sum(memory_mib(p)[0] for p in [proc.pid, *children(proc.pid)])
                print(
                    f"{n} worker(s): soak {args.minutes:g} min, 90/10 read/write, "
                    f"{args.connections} connections {offered}: "
                    f"{soak.requests_per_s:.0f} req/s achieved, "
                    f"{soak.requests} requests, {soak.errors} errors, p50 {soak.p50_ms:.2f} ms, "
                    f"p99 {soak.p99_ms:.2f} ms; RSS of all processes at the end {rss:.0f} MiB"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            client = redis.Redis.from_url(REDIS)
            keys = list(client.scan_iter(f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)


if __name__ == "__main__":
    main()
