"""Soak: hold a target request rate against a real server for minutes; watch errors and memory.

One server process (the real app on the dataset, in-process or Redis store) and wrk on
loopback: every connection pauses ``connections / rate`` between an answer and its next request
(wrk's ``delay``), so ``--rate`` is an upper bound on what is offered: the latency adds to each
pause, and the achieved rate is about ``rate x pause / (pause + latency)`` when the server
keeps up (offer more, or use more connections, to hold a target); ``--rate 0`` does not pace
(closed loop: the achieved rate is what the server holds at that concurrency). The mix: 90%
``GET /recommend`` for random users and 10% ``POST /interactions`` of one event. The server's
resident memory is sampled every ``--every`` seconds; the figures to read are the achieved
rate, the errors, and RSS at the start and the end.

    .venv/bin/python benchmarks/soak.py [DATA] [--minutes 5] [--rate 1000] [--redis]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from serve_load import server, wrk

from harness.catalogues import dataset_catalogue
from harness.redis_servers import REDIS
from service.runtime import keep_freed_memory


def mixed_script(users: list[str], items: list[int], *, rate: float, connections: int) -> str:
    """The 90/10 mix; ``rate`` 0: unpaced (each connection sends its next request as soon as
    its answer is in, so the server is held at what it can do with this many connections)."""
    pause_ms = 1000 * connections / rate if rate > 0 else 0.0  # each connection's share
    return f"""
math.randomseed(5)
local users = {{{",".join(json.dumps(u) for u in users)}}}
local items = {{{",".join(map(str, items))}}}
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  local user = users[math.random(#users)]
  if math.random() < 0.1 then
    local body = string.format('{{"events":[{{"user_id":"%s","item_id":%d}}]}}',
      user, items[math.random(#items)])
    return wrk.format("POST", "/interactions", headers, body)
  end
  return wrk.format("GET", "/recommend/" .. user .. "?k=20")
end
""" + (f"delay = function()\n  return {pause_ms:.3f}\nend\n" if pause_ms else "")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="offered requests/s (0: unpaced)"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between RSS samples")
    parser.add_argument("--redis", action="store_true", help="profiles in Redis")
    args = parser.parse_args()
    keep_freed_memory()
    catalogue = dataset_catalogue(args.data, args.work_dir)
    settings = catalogue.settings
    if args.redis:
        settings = settings.model_copy(update={"redis_url": REDIS, "redis_prefix": "visrec-soak"})
    users = list(catalogue.histories)
    items = sorted({i for h in catalogue.histories.values() for i in h})
    script = mixed_script(users, items, rate=args.rate, connections=args.connections)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as hist:
        json.dump(catalogue.histories, hist)
        hist.flush()
        with server("ours", settings, Path(hist.name)) as (url, proc):
            pid = proc.pid
            wrk(url, script, connections=args.connections, seconds=10)  # warm-up
            samples = [(0.0, rss_mib(pid))]
            done = threading.Event()

            def sample() -> None:
                started = time.monotonic()
                while not done.wait(args.every):
                    samples.append((time.monotonic() - started, rss_mib(pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            seconds = round(args.minutes * 60)
            load = wrk(url, script, connections=args.connections, seconds=seconds)
            done.set()
            sampler.join()
            samples.append((float(seconds), rss_mib(pid)))
    print(
        f"{args.minutes:g} min at an offered {args.rate:.0f} req/s ({args.connections} "
        f"connections, {'Redis' if args.redis else 'in-process'} store): "
        f"{load.requests_per_s:.0f} req/s achieved, {load.requests} requests, "
        f"{load.errors} errors, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms"
    )
    print("server RSS (MiB) over time: " + ", ".join(f"{t:.0f}s {m:.1f}" for t, m in samples))
    print(f"RSS start {samples[0][1]:.1f} MiB, end {samples[-1][1]:.1f} MiB")
    sys.exit(1 if load.errors else 0)


if __name__ == "__main__":
    main()
