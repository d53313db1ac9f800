"""Events from a Redis Stream through ``visrec-ingest``: throughput, and nothing lost or applied
twice while consumers are SIGKILLed.

A Redis of its own (no persistence unless ``--fsync``) gets ``--events`` events (default
1,000,000) of ``--users`` users over the synthetic world's items, in time order (distinct
timestamps, so a user's profile does not depend on the order consumers apply them in; every
third event has an event id of its own, the others take their entry's). Then ``--consumers``
``visrec-ingest`` processes (default 3) drain it; when a third and two thirds of the entries
have been read, the first consumer is SIGKILLed and a new one started in its place. Printed:
the wall time from the consumers' start until every entry is read and acknowledged, events/s,
for each kill how long until the killed consumer's pending entries were all acknowledged by
the others, and the check: every user's profile in Redis equal to a replay of the events, in
order, through the in-process store.

    .venv/bin/python -m benchmarks.stream_ingest [--events 1000000] [--consumers 3]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import torch

from harness.redis_servers import RedisServer
from harness.streams import group, pending_of, replayed, start_consumer, stored
from service.ingest import stream_keys
from service.model.feature_store import load_features

PREFIX = "bench"


def draw(n: int, users: int, items: list[int], seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    who, what = rng.integers(users, size=n), rng.integers(len(items), size=n)
    out = []
    for i in range(n):
        event = {
            "user_id": f"u{who[i]}",
            "item_id": str(items[what[i]]),
            "timestamp": str(1.7e9 + i),
        }
        if i % 3 == 0:
            event["event_id"] = f"e{i}"
        out.append(event)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument(
        "--fsync", default="off", help="its AOF: off (as this machine's Redis), always, everysec"
    )
    args = parser.parse_args()
    from service.offline.bootstrap import prepare_serving

    _, features, _ = prepare_serving(None, args.work_dir, torch.device("cpu"))
    items = load_features(features)[1].item_ids
    events = draw(args.events, args.users, items)
    stream, _ = stream_keys(PREFIX)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        server = RedisServer(Path(folder), fsync=args.fsync)
        server.start()
        r = redis.Redis.from_url(server.url)
        try:
            t0 = time.perf_counter()
            for start in range(0, len(events), 10_000):
                with r.pipeline(transaction=False) as pipe:
                    for e in events[start : start + 10_000]:
                        pipe.xadd(stream, e)  # type: ignore[arg-type]
                    pipe.execute()
            print(f"{len(events):,} events in the stream ({time.perf_counter() - t0:.1f} s to add)")
            run(r, server.url, stream, features, args)
            expected = replayed(events)
            found = stored(server.url, PREFIX, list(expected))
            same = sum(found[u] == p for u, p in expected.items())  # recent and seen items
            print(f"profiles equal to the replay: {same:,} of {len(expected):,} users")
        finally:
            r.close()
            server.kill()


def run(r: redis.Redis, url: str, stream: str, features: Path, args: argparse.Namespace) -> None:
    names = iter(f"c{i}" for i in range(100))

    def consumer() -> tuple[str, subprocess.Popen[bytes]]:
        name = next(names)
        return name, start_consumer(name, features, url, PREFIX)

    procs = [consumer() for _ in range(args.consumers)]
    started = time.perf_counter()
    kills = [args.events // 3, 2 * args.events // 3]
    # (killed consumer, its entries pending at the kill, seconds until they were acknowledged)
    recoveries: list[tuple[str, int, float]] = []
    try:
        while True:
            g = group(r, stream)
            read = int(g["entries-read"] or 0) if g else 0
            if kills and read >= kills[0]:
                kills.pop(0)
                name, proc = procs.pop(0)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = time.perf_counter()
                left = pending_of(r, stream, name)
                procs.append(consumer())
                while pending_of(r, stream, name):
                    time.sleep(0.05)
                recoveries.append((name, left, time.perf_counter() - killed_at))
            if g and read == args.events and int(g["pending"]) == 0:
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            proc.wait(timeout=60)
    print(
        f"{args.consumers} consumers: {args.events:,} events read and acknowledged in "
        f"{seconds:.1f} s: {args.events / seconds:,.0f} events/s"
    )
    for name, left, took in recoveries:
        print(
            f"consumer {name} SIGKILLed with {left:,} entries pending: all acknowledged by the "
            f"others {took:.1f} s later"
        )


if __name__ == "__main__":
    main()
