"""Freshness: how long from an event accepted to the first ``/recommend`` that reflects it.

One ``visrec-serve`` of the synthetic world over a Redis of its own (no AOF), ``--consumers``
``visrec-ingest`` processes on its stream, and load beside them: ``wrk`` asking ``GET
/recommend`` over ``--connections`` connections without pause, and (for the stream) a producer
appending ``--rate`` background events a second (default 10,000) for users of their own. A
probe takes a dataset user's top item and sends an interaction with it; the user's next
``/recommend`` that no longer starts with that item (it is seen now) reflects the event.
Polled as fast as one client can; printed: p50/p95/max over ``--probes`` probes each, from
``POST /interactions`` acknowledged and from ``XADD`` returned, wrk's request rate and the rate
the producer kept.

    .venv/bin/python -m benchmarks.freshness [--probes 100] [--rate 10000] [--connections 4]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import redis
import torch

from benchmarks.fault_matrix import Deployment
from harness.redis_servers import RedisServer
from harness.streams import Producer, start_consumer
from service.ingest import stream_keys

PREFIX = "fresh"
TIMEOUT_S = 10.0  # a probe not reflected by then fails the run


def top(client: httpx.Client, user: str) -> int:
    return int(client.get(f"/recommend/{user}", params={"k": 1}).json()["items"][0]["item_id"])


def reflected(client: httpx.Client, user: str, item: int, since: float) -> float:
    """Seconds from ``since`` until ``user``'s top item is no longer ``item``."""
    while top(client, user) == item:
        if time.perf_counter() - since > TIMEOUT_S:
            raise RuntimeError(
                f"user {user}: the event of item {item} not reflected in {TIMEOUT_S} s"
            )
    return time.perf_counter() - since


def probes(
    n: int, users: list[str], send: Callable[[str, int, str], None], url: str
) -> list[float]:
    """Seconds to reflection of ``n`` events, each sent by ``send(user, item, event_id)``."""
    rng = np.random.default_rng(len(users) + n)
    out = []
    with httpx.Client(base_url=url) as client:
        for i, user in enumerate(rng.choice(users, size=n, replace=False)):
            item = top(client, user)
            send(user, item, f"probe-{send.__name__}-{i}")
            out.append(reflected(client, user, item, time.perf_counter()))
    return out


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    p50, p95 = np.percentile(ms, [50, 95])
    return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {ms.max():.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10_000, help="background events/s (stream)")
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4, help="wrk's, on /recommend")
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    from service.model.feature_store import load_features
    from service.offline.bootstrap import prepare_serving

    dataset, features, _ = prepare_serving(None, args.work_dir, torch.device("cpu"))
    users = [str(u) for u in dataset.user_ids.tolist()]
    items = load_features(features)[1].item_ids
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        server = RedisServer(Path(folder), fsync="off")
        server.start()
        deployment = Deployment("1", dataset.root, args.work_dir, server.url, PREFIX)
        consumers = [
            start_consumer(f"c{i}", features, server.url, PREFIX) for i in range(args.consumers)
        ]
        r = redis.Redis.from_url(server.url)
        load = Producer(r, stream_keys(PREFIX)[0], items)  # its rate set for the stream part
        try:
            deployment.start()
            run(args, deployment.url, users, r, load)
        finally:
            load.stop.set()
            for proc in consumers:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            deployment.stop()
            r.close()
            server.kill()


def run(
    args: argparse.Namespace, url: str, users: list[str], r: redis.Redis, load: Producer
) -> None:
    wrk = subprocess.Popen(
        ["wrk", "-t1", f"-c{args.connections}", "-d600s", f"{url}/recommend/1?k=20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    producer = threading.Thread(target=load.run, daemon=True)
    producer.start()
    stream, _ = stream_keys(PREFIX)
    try:
        with httpx.Client(base_url=url) as client:

            def http(user: str, item: int, event_id: str) -> None:
                event = {"user_id": user, "item_id": item, "event_id": event_id}
                client.post("/interactions", json={"events": [event]}).raise_for_status()

            def xadd(user: str, item: int, event_id: str) -> None:
                r.xadd(stream, {"user_id": user, "item_id": str(item), "event_id": event_id})

            time.sleep(1.0)  # wrk at its pace
            by_http = probes(args.probes, users[: len(users) // 2], http, url)
            load.set_rate(args.rate)
            time.sleep(2.0)  # the producer and the consumers at their pace
            produced, since = load.sent, time.perf_counter()
            by_stream = probes(args.probes, users[len(users) // 2 :], xadd, url)
            kept = (load.sent - produced) / (time.perf_counter() - since)
            unread = r.xinfo_groups(stream)[0]["lag"]
    finally:
        load.stop.set()
        wrk.send_signal(signal.SIGINT)  # wrk stops and prints what it did
        out, _ = wrk.communicate(timeout=30)
    rate = next((line.split()[1] for line in out.splitlines() if "Requests/sec" in line), "?")
    print(f"from POST /interactions acknowledged: {percentiles(by_http)} ({args.probes} probes)")
    print(f"from XADD returned: {percentiles(by_stream)} ({args.probes} probes)")
    print(
        f"load: wrk {rate} GET /recommend a second over {args.connections} connections "
        f"throughout; the producer kept {kept:,.0f} events/s (asked {args.rate:,.0f}); "
        f"entries not yet read at the end: {unread}"
    )


if __name__ == "__main__":
    main()
