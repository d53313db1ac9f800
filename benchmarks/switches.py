"""Switching an item off: how long until no process answers with it, and whether any does after.

Three ``visrec-serve`` replicas of the synthetic world behind a real HAProxy (as
``benchmarks/fault_matrix.py`` starts them, over a Redis of their own). ``--switches`` times:
take the first item of a user's ``GET /recommend`` (k = 20), switch it off with ``PATCH
/items/{id}`` through the load balancer, and ask each replica directly, over and over, until
none answers with it; the time from the PATCH's answer to the last replica's first answer
without it is the switch's visibility. Then ``--after`` requests through the load balancer
count answers that still hold a switched-off item (the goal: 0), and the item is switched on
again.

    .venv/bin/python -m benchmarks.switches [--switches 100] [--after 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.fault_matrix import Deployment
from harness.redis_servers import RedisServer


def visible_after(client: httpx.Client, urls: list[str], user: str, item: int) -> float:
    """Seconds from now until every url answers ``user`` without ``item``."""
    started = time.monotonic()
    waiting = set(urls)
    while waiting:
        for url in sorted(waiting):
            answer = client.get(f"{url}/recommend/{user}", params={"k": 20}).json()
            if item not in [i["item_id"] for i in answer["items"]]:
                waiting.discard(url)
        if time.monotonic() - started > 30:
            raise RuntimeError(f"item {item} still answered after 30 s by {sorted(waiting)}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--switches", type=int, default=100)
    parser.add_argument("--after", type=int, default=20, help="requests checked after each")
    args = parser.parse_args()
    from service.offline.bootstrap import prepare_serving

    dataset, _, _ = prepare_serving(None, args.work_dir, torch.device("cpu"))
    users = [str(u) for u in dataset.user_ids.tolist()]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        redis = RedisServer(Path(folder))
        redis.start()
        deployment = Deployment("3", dataset.root, args.work_dir, redis.url, "switches")
        try:
            deployment.start()
            replicas = [f"http://127.0.0.1:{port}" for port in deployment.ports]
            times, stale = [], 0
            with httpx.Client(timeout=10) as client:
                for _ in range(args.switches):
                    user = users[int(rng.integers(len(users)))]
                    answer = client.get(f"{deployment.url}/recommend/{user}").json()
                    item = answer["items"][0]["item_id"]
                    patch = client.patch(
                        f"{deployment.url}/items/{item}", json={"available": False}
                    )
                    patch.raise_for_status()
                    times.append(visible_after(client, replicas, user, item))
                    for _ in range(args.after):
                        answer = client.get(f"{deployment.url}/recommend/{user}").json()
                        stale += item in [i["item_id"] for i in answer["items"]]
                    client.patch(f"{deployment.url}/items/{item}", json={"available": True})
        finally:
            deployment.stop()
            redis.kill()
    ms = np.array(times) * 1000
    print(
        f"{os.cpu_count()} CPUs; 3 replicas behind HAProxy, {args.switches} switches: visible to "
        f"every replica after p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} "
        f"ms, max {ms.max():.0f} ms; {stale} of {args.switches * args.after} answers after that "
        "held a switched-off item"
    )


if __name__ == "__main__":
    main()
