"""Filters through HTTP: ``GET /recommend/{user}?k=20`` with a filter that 50%, 5% and 0.1% of
the items pass, against no filter, on a real server (``visrec-serve``'s app under uvicorn)
driven by wrk at one connection, after an unreported warm-up of the same length.

The catalogue's ``items.csv`` is written again with one more column, ``shelf``, as a catalogue
owner's own column would be: every item is on shelf ``all``, half of them (drawn) also on
``half``, 5% on ``five`` and 0.1% on ``tenth``. The filters are ``attribute=shelf:half`` and so
on. Before timing, each filter's answers are checked: every item passes, and each answer has
exactly ``min(k, passing)`` items.

    .venv/bin/python -m benchmarks.filters_http [DATA] [--index hnsw] [--seconds 10]
    .venv/bin/python -m benchmarks.filters_http --million runs/million   # make bench-million's

``--million`` serves the catalogue ``benchmarks/million.py`` built and trained (1M items).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import recommend_script, server, wrk
from harness.catalogues import dataset_catalogue, trained_catalogue
from service.index.item_index import INDEX_KINDS
from service.model.feature_store import META_FILE, FeatureMeta
from service.runtime import keep_freed_memory

SHELVES = {"half": 0.5, "five": 0.05, "tenth": 0.001}  # shelf -> share of items on it
K = 20  # as recommend_script asks


def write_catalogue(
    folder: Path, item_ids: list[int], source: Path | None, rng: np.random.Generator
) -> dict[str, set[int]]:
    """``folder/items.csv``: the items of ``source/items.csv`` (or bare ids) with a ``shelf``
    column; the items on each shelf."""
    rows = {}
    if source is not None:
        with (source / "items.csv").open(newline="", encoding="utf-8") as f:
            rows = {int(r["item_id"]): r for r in csv.DictReader(f)}
    drawn = rng.random(len(item_ids))
    shelves: dict[str, set[int]] = {name: set() for name in ["all", *SHELVES]}
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "items.csv").open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["item_id", "title", "genres", "image", "shelf"])
        for item, u in zip(item_ids, drawn.tolist(), strict=True):
            on = ["all", *(name for name, share in SHELVES.items() if u < share)]
            for name in on:
                shelves[name].add(item)
            row = rows.get(item, {})
            out.writerow([item, row.get("title", ""), row.get("genres", ""), "", "|".join(on)])
    return shelves


def check(
    url: str, users: list[str], histories: dict[str, list[int]], name: str, shelf: set[int]
) -> None:
    """Every answer holds only items on the shelf, unseen, and min(k, passing) of them."""
    for user in users[:20]:
        query: dict[str, str | int] = {"k": K, "attribute": f"shelf:{name}"}
        body = httpx.get(f"{url}/recommend/{user}", params=query, timeout=600).json()
        got = [i["item_id"] for i in body["items"]]
        passing = shelf - set(histories[user])
        if body["fallback"]:
            passing = shelf  # a user the model does not know: popular items, nothing seen
        assert set(got) <= passing, f"{user}: items off the shelf"
        assert len(got) == min(K, len(passing)) == min(K, body["passing"]), (user, len(got))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--million", type=Path, help="benchmarks/million.py's work folder")
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    parser.add_argument("--index", choices=INDEX_KINDS, default=None)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (or make bench-serve)")
    keep_freed_memory()
    rng = np.random.default_rng(0)
    if args.million is not None:
        catalogue, source, index = trained_catalogue(args.million), None, args.index or "hnsw"
    else:
        catalogue = dataset_catalogue(args.data, args.work_dir)
        source, index = args.data, args.index or "flat"
    meta = FeatureMeta.from_json((catalogue.settings.features / META_FILE).read_text())
    item_ids, histories = meta.item_ids, catalogue.histories
    with tempfile.TemporaryDirectory() as tmp:
        histories_file = Path(tmp) / "histories.json"
        histories_file.write_text(json.dumps(histories))
        shelves = write_catalogue(Path(tmp) / "data", item_ids, source, rng)
        users = sorted(histories)
        update = {"data": Path(tmp) / "data", "index": index}
        settings = catalogue.settings.model_copy(update=update)
        print(
            f"{os.cpu_count()} CPUs; {len(item_ids):,} items, index {index}; wrk, 1 connection, "
            f"{args.seconds} s each, GET /recommend/{{user}}?k={K} for random known users",
            flush=True,
        )
        with server("ours", settings, histories_file, timeout_s=3600) as (url, _):
            # unreported: the first requests fault the mapped tables in, whichever goes first
            wrk(url, recommend_script(users), connections=1, seconds=args.seconds)
            base = None
            for name in ["none", *SHELVES]:
                extra = "" if name == "none" else f"&attribute=shelf:{name}"
                if name != "none":
                    check(url, users, histories, name, shelves[name])  # and warms it up
                load = wrk(url, recommend_script(users, extra), connections=1, seconds=args.seconds)
                base = base or load
                share = len(shelves[name]) / len(item_ids) if name != "none" else 1.0
                print(
                    f"  filter {name:6s} ({share:7.2%} pass): p50 {load.p50_ms:6.2f} ms "
                    f"({load.p50_ms / base.p50_ms:5.2f}x), p99 {load.p99_ms:6.2f} ms "
                    f"({load.p99_ms / base.p99_ms:5.2f}x), {load.requests_per_s:6.0f} req/s, "
                    f"{load.errors} errors",
                    flush=True,
                )


if __name__ == "__main__":
    main()
