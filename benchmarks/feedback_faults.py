"""``POST /feedback`` at a steady rate while Redis is SIGKILLed and restarted from its AOF:
every feedback acknowledged in the end, and nothing counted lost or twice.

A Redis of its own with its AOF fsynced on every write, and ``visrec-serve --workers 2`` of the
synthetic world over it. First ``--answers`` answers of ``GET /recommend`` are asked for, each
of ``--shown`` items (default 20, a page of results); then feedback on them is sent at
``--rate`` requests a second (each: the items shown, and a click on one of them in one request
of five) for ``--seconds``; at a third of the way Redis is SIGKILLed and started again
``--down`` seconds later (it reads its AOF back). A feedback answered 503 is sent again after
its Retry-After, as the API asks of clients; any other status is an error. Printed: events
(impressions and clicks) a second acknowledged, errors, retries, and the check: the counts
Redis holds afterwards (``GET /feedback``) against the distinct (answer, item) impressions and
clicks that were acknowledged.

    .venv/bin/python -m benchmarks.feedback_faults [--rate 300] [--shown 20] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.fault_matrix import Deployment
from harness.load import paced
from harness.redis_servers import RedisServer


class Sent:
    def __init__(self) -> None:
        self.impressions: set[tuple[str, int]] = set()  # acknowledged (answer, item)
        self.clicks: set[tuple[str, int]] = set()
        self.events = 0  # impressions and clicks in acknowledged requests
        self.errors: list[str] = []
        self.retries = 0
        self.events_per_s = 0.0  # acknowledged, over the run


async def send(client: httpx.AsyncClient, body: dict, sent: Sent) -> None:
    """One feedback, sent again after Retry-After while the answer is 503."""
    while True:
        try:
            answer = await client.post("/feedback", json=body)
        except httpx.HTTPError as err:
            sent.errors.append(repr(err))
            return
        if answer.status_code == 503:
            sent.retries += 1
            await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
            continue
        if answer.status_code != 200:
            sent.errors.append(f"{answer.status_code} {answer.text[:200]}")
            return
        rid = body["request_id"]
        sent.impressions |= {(rid, i) for i in body["impressions"] + body["clicks"]}
        sent.clicks |= {(rid, i) for i in body["clicks"]}
        sent.events += len(body["impressions"]) + len(body["clicks"])
        return


async def load(url: str, answers: list[dict], args: argparse.Namespace, redis: RedisServer) -> Sent:
    sent = Sent()
    rng = np.random.default_rng(0)
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def request(n: int) -> None:
            answer = answers[n % len(answers)]
            shown = [i["item_id"] for i in answer["items"]]
            clicks = [shown[rng.integers(len(shown))]] if n % 5 == 0 else []
            body = {"request_id": answer["request_id"], "impressions": shown, "clicks": clicks}
            await send(client, body, sent)

        async def fault() -> None:
            await asyncio.sleep(args.seconds / 3)
            await asyncio.to_thread(redis.kill)
            await asyncio.sleep(args.down)
            await asyncio.to_thread(redis.start)
            await asyncio.sleep(args.seconds * 2 / 3 - args.down)
            stop.set()

        started = time.perf_counter()
        await asyncio.gather(paced(args.rate, stop, request), fault())
        sent.events_per_s = sent.events / (time.perf_counter() - started)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300, help="feedback requests a second")
    parser.add_argument("--shown", type=int, default=20, help="items in an answer, all shown")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--down", type=float, default=2.0, help="seconds Redis stays down")
    parser.add_argument("--answers", type=int, default=5000)
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    from service.offline.bootstrap import prepare_serving

    dataset, _, _ = prepare_serving(None, args.work_dir, torch.device("cpu"))
    users = [str(u) for u in dataset.user_ids.tolist()]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        redis = RedisServer(Path(folder), fsync="always")
        redis.start()
        deployment = Deployment("2", dataset.root, args.work_dir, redis.url, "feedback")
        try:
            deployment.start()
            with httpx.Client(base_url=deployment.url, timeout=30) as client:
                answers = [
                    client.get(
                        f"/recommend/{users[n % len(users)]}", params={"k": args.shown}
                    ).json()
                    for n in range(args.answers)
                ]
                time.sleep(1.0)  # the last answers kept
                sent = asyncio.run(load(deployment.url, answers, args, redis))
                totals = client.get("/feedback").json()
        finally:
            deployment.stop()
            redis.kill()
    counted = (sum(t["impressions"] for t in totals), sum(t["clicks"] for t in totals))
    print(
        f"{args.rate:,.0f} feedback requests/s for {args.seconds:.0f} s, Redis SIGKILLed at "
        f"{args.seconds / 3:.0f} s and back (AOF) {args.down:.0f} s later: "
        f"{sent.events_per_s:,.0f} events/s acknowledged, "
        f"{len(sent.errors)} errors, {sent.retries} retries after 503"
    )
    print(
        f"counted in Redis: {counted[0]:,} impressions, {counted[1]:,} clicks; acknowledged "
        f"(distinct answer and item): {len(sent.impressions):,} impressions, "
        f"{len(sent.clicks):,} clicks"
    )
    for error in sent.errors[:5]:
        print("error:", error)


if __name__ == "__main__":
    main()
