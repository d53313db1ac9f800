"""Model swaps under load: a real uvicorn server swaps its model while wrk drives requests.

The server (``serve_load.py``'s child: the real app, in-process store) serves checkpoint A from a
file of its own. wrk drives ``GET /recommend/{user}?k=20`` for random known users, and a second
wrk ``POST /interactions``, first for ``--seconds`` without a swap (the baseline), then as long
again while the script swaps models: it writes checkpoint B or A over the serving file (an
atomic rename, as a deployment should) and asks for a reload, by ``POST /admin/reload`` and by
SIGHUP in turn, plus one reload of a missing file that must be refused. A poller sends
``GET /recommend`` every 20 ms and checks each answer's ``model_version``: one sent after a
reload returned must name the new model. Checkpoint B is A's weights with seeded noise added:
the run measures the swap, not the model.

    .venv/bin/python benchmarks/reload_load.py [DATA] [--seconds 20] [--swaps 6] [--big 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from serve_load import (
    Catalogue,
    Load,
    dataset_catalogue,
    interactions_script,
    print_load,
    recommend_script,
    server,
    synthetic_catalogue,
    wrk,
)

from service.model.checkpoint import load_checkpoint, save_checkpoint
from service.runtime import keep_freed_memory


@dataclasses.dataclass(frozen=True)
class Reload:
    how: str  # "admin" or "SIGHUP"
    sent: float  # monotonic time the reload was asked for
    done: float  # ... and when it had answered (admin) or the new version was seen (SIGHUP)
    status: int
    version: str  # serving afterwards
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Answer:
    sent: float
    done: float
    status: int  # 0: no HTTP answer at all
    version: str | None


def noisy_copy(checkpoint: Path, out: Path, *, seed: int = 1, scale: float = 0.05) -> Path:
    """``checkpoint``'s weights plus seeded Gaussian noise: another model for the same features."""
    if out.is_file():
        return out
    ckpt = load_checkpoint(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen)
        if v.is_floating_point()
        else v
        for k, v in ckpt.state.items()
    }
    save_checkpoint(out, dataclasses.replace(ckpt, state=state))
    return out


def call(url: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def version(url: str) -> str:
    return str(call(f"{url}/readyz")[1]["model_version"])


def poll(url: str, user: str, stop: threading.Event, answers: list[Answer]) -> None:
    while not stop.is_set():
        sent = time.monotonic()
        try:
            status, body = call(f"{url}/recommend/{user}?k=5")
            got = body.get("model_version")
        except OSError:
            status, got = 0, None
        answers.append(Answer(sent, time.monotonic(), status, got))
        time.sleep(0.02)


def replace_file(source: Path, target: Path) -> None:
    tmp = target.with_suffix(".incoming")
    shutil.copy(source, tmp)
    os.replace(tmp, target)  # a reload never reads a half-copied file


def swap(url: str, proc: subprocess.Popen[bytes], how: str) -> Reload:
    before, sent = version(url), time.monotonic()
    if how == "admin":
        status, body = call(f"{url}/admin/reload", "POST")
        after = str(body.get("model_version"))
        return Reload(how, sent, time.monotonic(), status, after, str(body.get("detail", "")))
    proc.send_signal(signal.SIGHUP)
    deadline = sent + 120
    while (after := version(url)) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    return Reload(how, sent, time.monotonic(), 200 if after != before else 0, after)


def swaps(
    url: str,
    proc: subprocess.Popen[bytes],
    files: tuple[Path, Path],
    serving: Path,
    *,
    n: int,
    interval_s: float,
) -> list[Reload]:
    """``n`` swaps, each ``interval_s`` after the previous one ended, alternating the
    checkpoint and how the reload is asked for, and one refused reload in the middle."""
    done: list[Reload] = []
    for i in range(n):
        time.sleep(interval_s)
        replace_file(files[(i + 1) % 2], serving)
        done.append(swap(url, proc, "admin" if i % 2 == 0 else "SIGHUP"))
        if i == n // 2 - 1:
            sent = time.monotonic()
            status, body = call(f"{url}/admin/reload", "POST", {"checkpoint": "/no/such.pt"})
            refused = Reload("admin", sent, time.monotonic(), status, body["model_version"])
            done.append(dataclasses.replace(refused, detail=body["detail"]))
    return done


def stale(answers: list[Answer], reloads: list[Reload], first: str) -> int:
    """Answers sent after a reload returned (and back before the next began) that do not name
    the version it left serving."""
    swapped = [r for r in reloads if r.status == 200]  # a refused one changes nothing
    marks = [(0.0, first)] + [(r.done, r.version) for r in swapped]
    starts = [r.sent for r in swapped] + [float("inf")]
    bad = 0
    for (done, expected), next_start in zip(marks, starts, strict=True):
        window = [a for a in answers if done < a.sent and a.done < next_start]
        bad += sum(1 for a in window if a.version != expected)
    return bad


def run(catalogue: Catalogue, args: argparse.Namespace, work: Path) -> None:
    a = work / "a.pt"
    shutil.copy(catalogue.settings.checkpoint, a)
    b = noisy_copy(a, work / "b.pt")
    serving = work / "serving.pt"
    shutil.copy(a, serving)
    settings = catalogue.settings.model_copy(update={"checkpoint": serving})
    histories = work / "histories.json"
    histories.write_text(json.dumps(catalogue.histories))
    users = list(catalogue.histories)
    items = sorted({i for h in catalogue.histories.values() for i in h})
    read, write = recommend_script(users), interactions_script(users, items, 1)
    print(f"\n== {catalogue.name}: {args.connections} + 2 connections, {args.seconds} s each")
    with server("ours", settings, histories) as (url, proc), ThreadPoolExecutor(4) as pool:

        def load() -> tuple[Load, Load]:
            reads = pool.submit(wrk, url, read, connections=args.connections, seconds=args.seconds)
            writes = pool.submit(wrk, url, write, connections=2, seconds=args.seconds)
            return reads.result(), writes.result()

        base_reads, base_writes = load()
        print_load("baseline: GET /recommend", base_reads)
        print_load("baseline: POST /interactions", base_writes)
        first, stop = version(url), threading.Event()
        answers: list[Answer] = []
        poller = pool.submit(poll, url, users[0], stop, answers)
        reads = pool.submit(wrk, url, read, connections=args.connections, seconds=args.seconds)
        writes = pool.submit(wrk, url, write, connections=2, seconds=args.seconds)
        end = time.monotonic() + args.seconds
        interval = args.seconds / (args.swaps + 1) - args.reload_s
        reloads = swaps(url, proc, (a, b), serving, n=args.swaps, interval_s=max(interval, 0.5))
        swap_reads, swap_writes = reads.result(), writes.result()
        stop.set()
        poller.result()
    print_load(f"{args.swaps} swaps: GET /recommend", swap_reads)
    print_load(f"{args.swaps} swaps: POST /interactions", swap_writes)
    for r in reloads:
        took = r.done - r.sent
        print(f"  reload by {r.how:6s} {r.status}  {took:5.2f} s  now {r.version}  {r.detail[:70]}")
    failed = sum(1 for x in answers if x.status != 200)
    runs = [
        f"{v[-6:] if v else v}x{len(list(g))}"
        for v, g in itertools.groupby(a.version for a in answers)
    ]
    print(
        f"  poller: {len(answers)} answers, {failed} failed, "
        f"{stale(answers, reloads, first)} with a stale version after a reload returned; "
        f"versions in order: {' '.join(runs)}"
    )
    errors = swap_reads.errors + swap_writes.errors + failed
    ok = sum(1 for r in reloads if r.status == 200) == args.swaps
    late = sum(1 for r in reloads if r.done > end)
    if late:
        print(f"  {late} reload(s) ended after the load: try more --seconds or fewer --swaps")
    print(f"  {'PASS' if errors == 0 and ok else 'FAIL'}: {errors} failed requests during swaps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument(
        "--reload-s", type=float, default=2.0, help="how long a reload takes under load, about"
    )
    parser.add_argument("--big", type=int, default=0, help="also a synthetic catalogue this big")
    args = parser.parse_args()
    keep_freed_memory()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (or make bench-serve)")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, wrk with 1 thread each, loopback")
    catalogues = [dataset_catalogue(args.data, args.work_dir)]
    if args.big:
        catalogues.append(synthetic_catalogue(args.big, args.work_dir))
    for catalogue in catalogues:
        with tempfile.TemporaryDirectory() as work:
            run(catalogue, args, Path(work))


if __name__ == "__main__":
    main()
