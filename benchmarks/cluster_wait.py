"""What ``WAIT 1`` costs on a Redis Cluster: the profile store's writes with and without it.

A real cluster of 3 primaries with a replica each (``redis-server --cluster-enabled yes``, AOF
``appendfsync always`` on every node, all on this machine), and ``RedisProfileStore.add`` of one
event (with an id) per call for random users, from 1 and from 16 concurrent writers: writes/s,
p50 and p99, without ``WAIT`` (acknowledged once the primary applied and fsynced it) and with
``VISREC_REDIS_WAIT_REPLICAS=1`` (once a replica has it too), in the same run.

    .venv/bin/python -m benchmarks.cluster_wait [--writes 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from harness.redis_servers import Cluster
from service.store.profiles import Interaction
from service.store.redis.profiles import RedisProfileStore


async def writes(url: str, *, wait: int, writers: int, count: int) -> tuple[float, float, float]:
    """(writes/s, p50 ms, p99 ms) of ``count`` single-event adds from ``writers`` tasks."""
    store = RedisProfileStore.from_url(
        url, prefix=f"bench-wait-{wait}-{writers}", deadline_s=2.0, wait_replicas=wait
    )
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for n in range(count // writers):
            started = time.perf_counter()
            await store.add([Interaction(f"u{(w * 7919 + n) % 5000}", n, None, f"{w}-{n}")])
            latencies.append(time.perf_counter() - started)

    try:
        await store.add([Interaction("warm-up", 1, None, "warm-up")])
        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / seconds, cuts[49] * 1e3, cuts[98] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cluster = Cluster(Path(folder), replicas=1)
        try:
            cluster.start()
            print("3 primaries + 3 replicas on loopback, appendfsync always, one event a call")
            for writers in (1, 16):
                rates = {}
                for wait in (0, 1):
                    rate, p50, p99 = asyncio.run(
                        writes(cluster.url, wait=wait, writers=writers, count=args.writes)
                    )
                    rates[wait] = rate
                    print(
                        f"  {writers:2d} writer(s), WAIT {wait}: {rate:7.0f} writes/s, "
                        f"p50 {p50:5.2f} ms, p99 {p99:5.2f} ms"
                    )
                ratio = rates[1] / rates[0]
                print(f"  {writers:2d} writer(s): WAIT 1 / none = {ratio:.2f}x writes/s")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
