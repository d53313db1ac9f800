"""A live stream's lag around a killed consumer: how far behind ``visrec-ingest`` runs while
events arrive, and how soon after a SIGKILL it is back under a second.

A Redis of its own (no AOF), ``--consumers`` ``visrec-ingest`` processes (default 3) and a
producer appending ``--rate`` events a second (default 10,000) for ``--seconds`` (default 20).
At ``--kill-at`` seconds (default 8) the first consumer is SIGKILLed, at a moment it holds
entries (read, not yet acknowledged), and a new one started. The
lag, sampled every 0.1 s, is the age of the oldest entry not yet acknowledged (pending, or not
yet read): entry ids carry the time they were added. Printed: the lag before the kill (median,
max), its largest after, and how long after the kill it was back under 1 s for good.

    .venv/bin/python -m benchmarks.stream_lag [--rate 10000] [--seconds 20] [--kill-at 8]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
import torch

from harness.redis_servers import RedisServer
from harness.streams import Producer, group, pending_of, start_consumer
from service.ingest import GROUP, stream_keys
from service.model.feature_store import load_features

PREFIX = "lag"


def lag_s(r: redis.Redis, stream: str) -> float:
    """Age of the oldest entry not yet acknowledged; 0 when there is none."""
    oldest: list[int] = []
    pending = r.xpending(stream, GROUP)
    if pending["pending"]:
        oldest.append(_ms(pending["min"]))
    found = group(r, stream)
    if found is not None:
        unread: list[tuple[bytes, dict]] = r.xrange(  # type: ignore[assignment]
            stream, min=f"({_text(found['last-delivered-id'])}", count=1
        )
        if unread:
            oldest.append(_ms(unread[0][0]))
    now_ms = r.time()
    now = now_ms[0] * 1000 + now_ms[1] // 1000
    return max(0.0, (now - min(oldest)) / 1000) if oldest else 0.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(entry_id: bytes | str) -> int:
    """When an entry was added, in ms: the first part of its id."""
    return int(_text(entry_id).split("-")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--kill-at", type=float, default=8)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    from service.offline.bootstrap import prepare_serving

    _, features, _ = prepare_serving(None, args.work_dir, torch.device("cpu"))
    items = load_features(features)[1].item_ids
    stream, _ = stream_keys(PREFIX)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        server = RedisServer(Path(folder), fsync="off")
        server.start()
        r = redis.Redis.from_url(server.url)

        def consumer(name: str) -> subprocess.Popen[bytes]:
            return start_consumer(name, features, server.url, PREFIX)

        procs = [consumer(f"c{i}") for i in range(args.consumers)]
        try:
            while group(r, stream) is None:
                time.sleep(0.1)  # the consumers are up and made the group
            events = Producer(r, stream, items, args.rate)
            producer = threading.Thread(target=events.run, args=(args.seconds,))
            started = time.perf_counter()
            producer.start()
            samples: list[tuple[float, float]] = []  # (seconds since start, lag)
            killed, held = False, 0
            while producer.is_alive():
                now = time.perf_counter() - started
                if not killed and now >= args.kill_at:
                    held = holding(r, stream, "c0")  # killed while it holds entries
                    procs[0].send_signal(signal.SIGKILL)
                    procs[0].wait()
                    procs.append(consumer("replacement"))
                    killed = True
                samples.append((now, lag_s(r, stream)))
                time.sleep(0.1)
            producer.join()
            report(samples, args, events.sent, held)
        finally:
            for p in procs[1:]:
                p.send_signal(signal.SIGTERM)
            for p in procs[1:]:
                p.wait(timeout=30)
            r.close()
            server.kill()


def holding(r: redis.Redis, stream: str, name: str, wait_s: float = 2.0) -> int:
    """The entries ``name`` holds (pending), once it holds some (or ``wait_s`` passed)."""
    deadline = time.monotonic() + wait_s
    while True:
        held = pending_of(r, stream, name)
        if held or time.monotonic() > deadline:
            return held
        time.sleep(0.001)


def report(
    samples: list[tuple[float, float]], args: argparse.Namespace, sent: int, held: int
) -> None:
    before = [lag for t, lag in samples if t < args.kill_at]
    after = [(t, lag) for t, lag in samples if t >= args.kill_at]
    last_over = max((t for t, lag in after if lag >= 1.0), default=None)
    back = "never over 1 s" if last_over is None else f"{last_over - args.kill_at + 0.1:.1f} s"
    print(
        f"{args.consumers} consumers, {sent / args.seconds:,.0f} events/s for {args.seconds:.0f} "
        f"s: lag before the kill median {np.median(before):.2f} s, max {max(before):.2f} s; "
        f"after the SIGKILL at {args.kill_at:.0f} s (of a consumer holding {held} entries) max "
        f"{max(lag for _, lag in after):.2f} s, "
        f"back under 1 s for good after {back}"
    )


if __name__ == "__main__":
    main()
