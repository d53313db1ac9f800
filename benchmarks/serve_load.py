"""Serving speed under load, measured with wrk on loopback against real uvicorn processes.

For each catalogue (the dataset's, e.g. ml100k, and a synthetic one of ``--big`` items) a server
process runs the real app (``create_app``: micro-batching, FAISS, the in-process or Redis profile
store) under uvicorn as ``visrec-serve`` runs it (``run_server``, its defaults: no access
log), and wrk drives ``GET /recommend/{user}?k=20`` for random known users at several
connection counts, then ``POST /interactions``. In the same run a second server serves the
tutorial's way on the same framework and store: per request a full ACF forward over the raw
features of the user's profile (the tutorial's ``ACF.recommend_all``: gather, reduce, attend,
score every item), then a full sort. Approximate indexes are
compared with the exact one in-process (recall@20 and time per query).

    .venv/bin/python benchmarks/serve_load.py [DATA] [--seconds 10] [--big 100000]

wrk comes from Debian (``apt-get install wrk``; ``make bench-serve`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from harness.catalogues import Catalogue, dataset_catalogue, synthetic_catalogue
from harness.processes import free_port, wait_for
from harness.redis_servers import REDIS
from service.api.app import create_app
from service.config import Settings
from service.engine import build_engine
from service.index.item_index import IndexKind, ItemIndex
from service.model.acf import UNKNOWN_USER
from service.model.checkpoint import load_checkpoint
from service.model.feature_store import (
    load_features,
)
from service.model.serving import ServingModel
from service.recommender import Query
from service.runtime import keep_freed_memory
from service.serve import run_server

CPU = torch.device("cpu")
T = TypeVar("T")


# --------------------------------------------------------------------------- the servers


def serve(kind: str, settings: Settings, histories_file: Path, port: int) -> None:
    """Run one server in this process (the child side of ``server``)."""
    histories = json.loads(histories_file.read_text())
    if kind == "ours":
        app = create_app(settings, profiles=histories)
    else:
        app = tutorial_app(settings, histories)
    run_server(app, settings, host="127.0.0.1", port=port)  # as visrec-serve runs it


class TutorialWay:
    """The tutorial's ``ACF.recommend_all`` and a full sort: per request the profile's raw
    features are gathered and reduced, both attentions run, every item is scored and all are
    sorted. Same trained weights as ours, so the answers are the same."""

    def __init__(self, settings: Settings) -> None:
        ckpt = load_checkpoint(settings.checkpoint)
        features, meta = load_features(settings.features)
        self.model = ckpt.build_model(
            features, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids
        )
        self.item_ids = ckpt.item_ids
        self.item_index = {raw: i + 1 for i, raw in enumerate(ckpt.item_ids)}
        self.user_index = {str(raw): u for u, raw in enumerate(ckpt.user_ids)}

    @torch.inference_mode()
    def recommend(self, user_id: str, history: list[int], k: int) -> list[tuple[int, float]]:
        model = self.model
        profile = torch.tensor([[self.item_index[i] for i in history[-9:]]])  # (1, L)
        user = torch.tensor([self.user_index.get(user_id, UNKNOWN_USER)])
        raw = model.features[profile.flatten()]  # (L, 49, C) raw features
        tables = model.encode_items(raw)
        rows = torch.arange(profile.numel()).view(profile.shape)
        attended = model.attend(user, profile, tables, rows=rows).user
        scores = (model.query_vectors(attended) @ model.item_vectors().T)[0]  # (N,)
        scores[[self.item_index[i] - 1 for i in history]] = -torch.inf  # seen
        order = torch.argsort(scores, descending=True)  # the full sort
        return [(self.item_ids[i], float(scores[i])) for i in order[:k].tolist()]


def tutorial_app(settings: Settings, histories: dict[str, list[int]]) -> FastAPI:
    """``TutorialWay`` behind the same framework, thread pool and kind of store as ours."""
    way = TutorialWay(settings)
    app = FastAPI()

    @app.get("/recommend/{user_id}")
    async def recommend_user(user_id: str, k: int = 20) -> dict[str, object]:
        top = await run_in_threadpool(way.recommend, user_id, histories.get(user_id, []), k)
        return {"user_id": user_id, "items": [{"item_id": i, "score": s} for i, s in top]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


@contextmanager
def server(
    kind: str, settings: Settings, histories: Path, *, timeout_s: float = 300
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server subprocess (this script with ``--serve``); yields its URL and process once
    /healthz answers (within ``timeout_s``: a first start at a million items builds its
    index for minutes)."""
    port = free_port()
    env = {**os.environ, **{f"VISREC_{k.upper()}": str(v) for k, v in settings if v is not None}}
    cmd = [sys.executable, __file__, "--serve", kind, "--histories", str(histories)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/healthz", [proc], timeout_s=timeout_s)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Load:
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers, socket errors and timeouts


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def wrk(url: str, script: str, *, connections: int, seconds: int) -> Load:
    """Run wrk (one thread: the server needs the other core) with a Lua request script."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (p50 and p99 and total and rate):
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Load(
        connections,
        float(rate.group(1)),
        _ms(p50.group(1)),
        _ms(p99.group(1)),
        int(total.group(1)),
        errors,
    )


def recommend_script(users: Sequence[str], query: str = "") -> str:
    """``GET /recommend/{user}?k=20`` for random users of ``users``, with ``query`` after."""
    ids = ",".join(json.dumps(u) for u in users)
    return f"""
math.randomseed(7)
local users = {{{ids}}}
request = function()
  return wrk.format("GET", "/recommend/" .. users[math.random(#users)] .. "?k=20{query}")
end
"""


def interactions_script(users: Sequence[str], items: Sequence[int], per_request: int) -> str:
    return f"""
math.randomseed(11)
local users = {{{",".join(json.dumps(u) for u in users)}}}
local items = {{{",".join(map(str, items))}}}
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  local events = {{}}
  for i = 1, {per_request} do
    events[i] = string.format('{{"user_id":"%s","item_id":%d}}',
      users[math.random(#users)], items[math.random(#items)])
  end
  local body = '{{"events":[' .. table.concat(events, ",") .. ']}}'
  return wrk.format("POST", "/interactions", headers, body)
end
"""


def print_load(label: str, load: Load, unit: str = "req/s") -> None:
    print(
        f"  {label:34s} c={load.connections:<3d} {load.requests_per_s:9.0f} {unit}  "
        f"p50 {load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms  "
        f"({load.requests} requests, {load.errors} errors)"
    )


# --------------------------------------------------------------------------- the catalogues


# --------------------------------------------------------------------------- in-process parts


def index_recall(catalogue: Catalogue, *, queries: int = 1000, k: int = 20) -> None:
    """Recall@k of the approximate indexes against exact search, on the served vectors."""
    ckpt = load_checkpoint(catalogue.settings.checkpoint)
    features, meta = load_features(catalogue.settings.features)
    model = ckpt.build_model(features, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids)
    serving = ServingModel.from_model(model, device=CPU)
    index_of = {raw: i + 1 for i, raw in enumerate(ckpt.item_ids)}
    users = list(catalogue.histories)[:queries]
    profiles = np.array([[index_of[i] for i in catalogue.histories[u][-9:]] for u in users])
    user_rows = np.array([ckpt.user_ids.index(int(u)) for u in users])
    q = serving.queries(user_rows, profiles)
    exact = ItemIndex(serving.item_vectors, kind="flat").search(q, k).items
    kinds: tuple[IndexKind, ...] = ("flat", "ivf", "hnsw")
    for kind in kinds:
        started = time.perf_counter()
        index = ItemIndex(serving.item_vectors, kind=kind)
        built = time.perf_counter() - started
        started = time.perf_counter()
        found = np.concatenate([index.search(q[i : i + 1], k).items for i in range(len(q))])
        per_query = (time.perf_counter() - started) / len(q) * 1e3
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)])
        print(
            f"  {kind:5s} recall@{k} {recall:.3f}  {per_query:.3f} ms per single query  "
            f"(built in {built:.1f} s)"
        )


def compute_per_request(catalogue: Catalogue, *, requests: int = 300) -> None:
    """The model work alone, one request at a time in this process: ours (precomputed tables,
    FAISS) against the tutorial's way, on the same users; also checks both give the same items."""
    settings = catalogue.settings
    ckpt = load_checkpoint(settings.checkpoint)
    features, meta = load_features(settings.features)
    ours = build_engine(
        ckpt, features, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids, device=CPU
    )
    tutorial = TutorialWay(settings)
    histories = list(catalogue.histories.items())[:requests]
    calls: dict[str, Callable[[str, list[int]], list[int]]] = {
        "ours": lambda u, h: ours.recommend([Query(u, h[-9:], set(h), k=20)])[0].items,
        "tutorial": lambda u, h: [i for i, _ in tutorial.recommend(u, h, 20)],
    }
    seconds, answers = {}, {}
    for name, call in calls.items():
        call(*histories[0])  # warm-up
        started = time.perf_counter()
        answers[name] = [call(u, h) for u, h in histories]
        seconds[name] = (time.perf_counter() - started) / len(histories)
        print(f"  model work per request, {name:9s} {seconds[name] * 1e3:7.3f} ms")
    same = np.mean([a == b for a, b in zip(answers["ours"], answers["tutorial"], strict=True)])
    print(
        f"  ours / tutorial's way: {seconds['tutorial'] / seconds['ours']:.1f}x less model time "
        f"per request; identical top-20 for {same:.0%} of {len(histories)} users"
    )


def redis_memory(histories: dict[str, list[int]]) -> float:
    """Bytes per user (``MEMORY USAGE`` of every key) with these histories loaded."""
    from redis import Redis

    from service.store.redis.profiles import RedisProfileStore

    prefix = f"visrec-bench-{os.getpid()}"

    async def measure() -> float:
        store = RedisProfileStore.from_url(REDIS, prefix=prefix)
        try:
            await store.load(histories)
            return await store.memory_per_user(list(histories))
        finally:
            await store.close()

    try:
        return asyncio.run(measure())
    finally:
        client = Redis.from_url(REDIS)
        for keys in _batched(client.scan_iter(f"{prefix}:*", count=1000), 1000):
            client.delete(*keys)


def _batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


# --------------------------------------------------------------------------- main


def recommend_sweep(
    kind: str, settings: Settings, hist: Path, label: str, script: str, args: argparse.Namespace
) -> list[Load]:
    """``GET /recommend`` at each connection count against one fresh server."""
    loads = []
    with server(kind, settings, hist) as (url, _):
        wrk(url, script, connections=4, seconds=2)  # warm-up
        for c in args.connections:
            loads.append(wrk(url, script, connections=c, seconds=args.seconds))
            print_load(f"GET /recommend k=20, {label}", loads[-1])
    return loads


def interactions_sweep(
    settings: Settings, hist: Path, label: str, catalogue: Catalogue, args: argparse.Namespace
) -> None:
    users = list(catalogue.histories)
    items = sorted({i for h in catalogue.histories.values() for i in h})
    with server("ours", settings, hist) as (url, _):
        for per_request in (1, 20):
            script = interactions_script(users, items, per_request)
            load = wrk(url, script, connections=8, seconds=args.seconds)
            events = Load(
                load.connections,
                load.requests_per_s * per_request,
                load.p50_ms,
                load.p99_ms,
                load.requests,
                load.errors,
            )
            print_load(f"POST /interactions {per_request}/request, {label}", events, "events/s")


def run_catalogue(catalogue: Catalogue, args: argparse.Namespace) -> None:
    print(f"\n== {catalogue.name}: {len(catalogue.histories):,} users with profiles")
    script = recommend_script(list(catalogue.histories))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(catalogue.histories, file)
        file.flush()
        hist = Path(file.name)
        default = catalogue.settings
        ours = recommend_sweep("ours", default, hist, "memory store", script, args)
        for window in args.windows:
            settings = default.model_copy(update={"batch_window_ms": window})
            recommend_sweep("ours", settings, hist, f"memory, window {window} ms", script, args)
        interactions_sweep(default, hist, "memory", catalogue, args)
        if args.redis:
            redis = default.model_copy(update={"redis_url": REDIS})
            recommend_sweep("ours", redis, hist, "Redis store", script, args)
            interactions_sweep(redis, hist, "Redis", catalogue, args)
        tutorial = recommend_sweep("tutorial", default, hist, "tutorial's way", script, args)
    if any(load.errors for load in ours):
        print("  ERRORS in our answers above: the figures are not valid")
    best = max(x.requests_per_s for x in ours) / max(x.requests_per_s for x in tutorial)
    print(
        f"  ours / tutorial's way: {best:.1f}x requests/s (best of each); p50 with one "
        f"connection {ours[0].p50_ms:.2f} vs {tutorial[0].p50_ms:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--big", type=int, default=100_000, help="synthetic catalogue size")
    parser.add_argument("--no-redis", dest="redis", action="store_false")
    parser.add_argument(
        "--windows", type=float, nargs="*", default=[], help="also try these batch windows (ms)"
    )
    # the child side: one server
    parser.add_argument("--serve", choices=["ours", "tutorial"], help=argparse.SUPPRESS)
    parser.add_argument("--histories", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep_freed_memory()
    if args.serve:
        serve(args.serve, Settings(), args.histories, args.port)  # type: ignore[call-arg]
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (or make bench-serve)")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, wrk with 1 thread, loopback")
    dataset = dataset_catalogue(args.data, args.work_dir)
    run_catalogue(dataset, args)
    compute_per_request(dataset)
    print("  index recall against exact search:")
    index_recall(dataset)
    if args.redis:
        print(f"  Redis memory per user: {redis_memory(dataset.histories):.0f} bytes")
    big = synthetic_catalogue(args.big, args.work_dir)
    run_catalogue(big, args)
    compute_per_request(big)
    print("  index recall against exact search (random vectors: the hard case for ANN):")
    index_recall(big)


if __name__ == "__main__":
    main()
