"""Filtered recommendations against unfiltered ones: latency and recall, through the engine.

A catalogue of ``--items`` item vectors (D = 64, drawn around 1,000 cluster centres, so an
approximate index has structure to use, as a trained model's vectors do) and three attributes
drawn at random, ``p50``, ``p5`` and ``p01``, which 50%, 5% and 0.1% of the items have. For each
index kind, ``Recommender.recommend`` answers one request at a time (k = 20, as ``GET
/recommend`` does, one thread), with no filter and with ``genres=<attribute>``: the time covers
the filter (``Attributes.passing``), the mask over the engine's items and the search, not the
model's forward pass (the query vectors are drawn, as a model would give them). Recall@20 is
against the exact ranking of the items that pass.

    .venv/bin/python benchmarks/filters.py [--items 1000000] [--kinds flat,hnsw] [--requests 300]

The HNSW index over a million vectors takes minutes to build; it is kept in ``--work``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from service.filters import Attributes, ItemFilter
from service.model.serving import Explanation
from service.recommender import Query, Recommender

DIM = 64
SHARES = {"p50": 0.5, "p5": 0.05, "p01": 0.001}


class DrawnQueries:
    """The engine's model, reduced to what the search needs: the item vectors, and a query
    vector per request (the request's one history item picks it)."""

    takes_new_items = reads_images = reads_users = False
    tags: tuple[str, ...] = ()
    projection_key = None

    def __init__(self, items: np.ndarray, queries: np.ndarray) -> None:
        self.item_vectors, self._queries = items, queries

    def queries(self, users: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        return self._queries[profiles[:, -1] - 1]

    def explain(self, user: int, profile: Sequence[int], item: int) -> Explanation:
        raise NotImplementedError

    def project(self, features: object) -> object:
        raise NotImplementedError

    def with_items(self, features: object, tags: object = None) -> DrawnQueries:
        raise NotImplementedError


def catalogue(n: int, requests: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    items = centres[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, DIM), np.float32)
    queries = centres[rng.integers(0, 1000, requests)] + rng.standard_normal(
        (requests, DIM), np.float32
    )
    return items, queries


def attributes(n: int, rng: np.random.Generator) -> Attributes:
    drawn = {name: rng.random(n) < share for name, share in SHARES.items()}
    rows: Iterable[tuple[int, list[str], str]] = (
        (i + 1, [name for name, has in drawn.items() if has[i]], "") for i in range(n)
    )
    return Attributes(rows)


def run(
    engine: Recommender, table: Attributes, spec: ItemFilter | None, requests: int
) -> tuple[np.ndarray, float]:
    """Milliseconds per request (one at a time), and the mean recall@20 against the exact
    ranking of the items that pass."""
    times, recalls = [], []
    vectors, queries = engine.serving.item_vectors, engine.serving._queries  # type: ignore[attr-defined]
    for r in range(requests):
        started = time.perf_counter()
        only = table.passing(spec) if spec else None
        (answer,) = engine.recommend([Query(None, [r + 1], (), 20, 0, only)])
        times.append(time.perf_counter() - started)
        ids = np.arange(1, len(vectors) + 1) if only is None else only.ids
        best = ids[np.argsort(-(vectors[ids - 1] @ queries[r]), kind="stable")[:20]]
        recalls.append(len(set(answer.items) & set(best.tolist())) / max(1, len(best)))
    return np.array(times) * 1000, float(np.mean(recalls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="flat,hnsw")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("runs/filters"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    items, queries = catalogue(args.items, args.requests, rng)
    table = attributes(args.items, rng)
    print(f"{os.cpu_count()} CPUs; {args.items:,} items, D = {DIM}; {args.requests} requests each")
    print("| index | filter | passing | p50 ms | p99 ms | p50 vs none | recall@20 |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        cache = args.work / f"{args.items}"
        cache.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        engine = Recommender(
            DrawnQueries(items, queries),  # type: ignore[arg-type]
            item_ids=range(1, args.items + 1),
            user_ids=[],
            popularity=np.zeros(args.items),
            index=kind,  # type: ignore[arg-type]
            index_cache=cache,
            profile_size=1,
        )
        print(f"  ({kind}: index ready in {time.perf_counter() - started:.1f} s)", flush=True)
        base = None
        for name in (None, *SHARES):
            spec = ItemFilter(genres=frozenset({name})) if name else None
            ms, recall = run(engine, table, spec, args.requests)
            p50 = float(np.percentile(ms, 50))
            base = base or p50
            passing = len(table.passing(spec).ids) if spec else args.items
            print(
                f"| {kind} | {name or 'none'} | {passing:,} | {p50:.2f} | "
                f"{np.percentile(ms, 99):.2f} | {p50 / base:.2f}x | {recall:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
