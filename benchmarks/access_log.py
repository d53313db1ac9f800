"""What the access log costs: `visrec-serve` itself (the command users run, its defaults but the
access log), once per ``VISREC_ACCESS_LOG`` share, each driven by wrk with
``GET /recommend/{user}?k=20`` for random users at 1, 16 and 64 connections, one after the
other in this run. The log goes to a file, as a container's log goes to a pipe; the lines are
counted.

    .venv/bin/python -m benchmarks.access_log [DATA] [--shares 0 0.01 1] [--seconds 10]

Needs a trained model for DATA (`make serve DATA=...` or `make reproduce` leave one in
runs/<data>/) and wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.serve_load import recommend_script, wrk
from harness.processes import free_port, wait_for


def _lines(path: str) -> int:
    return len(Path(path).read_text().splitlines())


def users_of(data: Path) -> list[str]:
    with (data / "interactions.csv").open() as f:
        return sorted({row["user_id"] for row in csv.DictReader(f)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.01, 1.0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    script = recommend_script(users_of(args.data))
    serve = Path(sys.executable).parent / "visrec-serve"
    baseline: dict[int, float] = {}
    print(f"visrec-serve {args.data}, GET /recommend/{{user}}?k=20, {args.seconds} s per level")
    for share in args.shares:
        port = free_port()
        env = {
            **os.environ,
            "VISREC_ACCESS_LOG": str(share),
            "VISREC_ENVIRONMENT": "development",
            "VISREC_RATE_LIMIT_PER_S": "0",  # wrk is one client
        }
        with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
            proc = subprocess.Popen(
                [str(serve), str(args.data), "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_for(f"{url}/healthz", [proc], timeout_s=300)
                lines_before = _lines(log.name)
                cells = []
                for c in args.connections:
                    load = wrk(url, script, connections=c, seconds=args.seconds)
                    baseline.setdefault(c, load.requests_per_s)
                    cells.append(
                        f"{c:>2} conn {load.requests_per_s:6.0f} req/s "
                        f"({load.requests_per_s / baseline[c]:.2f}x, p99 {load.p99_ms:.1f} ms, "
                        f"{load.errors} errors)"
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            lines = _lines(log.name) - lines_before
        print(f"access log {share:g}: " + "; ".join(cells) + f"; {lines} log lines")


if __name__ == "__main__":
    main()
