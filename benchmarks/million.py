"""A million-item catalogue on one machine: memory, start-up, latency, exact vs approximate.

1. **A world of 1,000,000 items** (built once into ``--work``, default ``runs/million``): items
   of 1,000 kinds, each kind an object (a random C-dim pattern) on a random 2x2 block of the 7x7
   grid over noise, C = 16 (feature width does not change serving cost: tables hold D = 64
   reduced dims); 50,000 users with 20 interactions each, mostly of their two favourite kinds,
   long-tailed popularity within a kind. The default ACF configuration is **trained** on it for
   ``--epochs`` (sampled softmax, as for any catalogue over 10,000 items), so the item vectors the
   indexes are tuned on are a trained model's, with the untrained long tail real catalogues have.
2. **Recall@20 of the approximate indexes against exact search**, in-process, with the queries of
   real users of that model, and on random vectors of the same shape (the hardest case).
3. **Servers**, one per index kind, started as ``visrec-serve`` runs the app (``run_server``):
   start-up time (first start writes the float16 serving tables next to the features, later ones
   map them), RSS (anonymous and file-backed), and wrk on ``GET /recommend/{user}?k=20`` at 1 and
   16 connections.

    .venv/bin/python benchmarks/million.py [--items 1000000] [--seconds 15] [--epochs 1]

Training, serving and FAISS use the GPU when there is one, as ``visrec-serve`` does; the script
prints where it ran (here: the CPU). wrk comes from Debian (``make bench-million`` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import serve_load
import torch
from serve_load import print_load, recommend_script, wrk
from tqdm.auto import tqdm

from harness.processes import free_port, wait_for
from service.engine import Source, load_engine
from service.index.item_index import INDEX_KINDS, IndexKind, ItemIndex, gpu_available
from service.model.acf import ACF
from service.model.checkpoint import Checkpoint, save_checkpoint
from service.model.feature_store import (
    FEATURES_FILE,
    META_FILE,
    PROGRESS_FILE,
    FeatureMeta,
    load_features,
)
from service.offline.data.sampling import build_samples, epoch_batches
from service.offline.training.config import TrainConfig
from service.offline.training.objective import Objective
from service.runtime import keep_freed_memory, pick_device

GRID, CELLS = 7, 49


@dataclass(frozen=True)
class WorldSize:
    items: int = 1_000_000
    kinds: int = 1_000
    users: int = 50_000
    per_user: int = 20
    feature_dim: int = 16
    taste: float = 0.8  # share of a user's interactions with their two favourite kinds


def write_features(folder: Path, size: WorldSize, rng: np.random.Generator) -> np.ndarray:
    """(N, 49, C) float16 features in ``folder`` (the feature store's layout); returns each
    item's kind (N,). Item i + 1 has kind ``i % kinds``."""
    meta = FeatureMeta(
        "synthetic-kinds", 0, size.feature_dim, GRID, list(range(1, size.items + 1)),
        f"million-{size.items}-{size.kinds}-{size.feature_dim}",
    )  # fmt: skip
    kinds = np.arange(size.items) % size.kinds
    patterns = rng.standard_normal((size.kinds, size.feature_dim)).astype(np.float32) * 2
    folder.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(
        folder / FEATURES_FILE, mode="w+", dtype=np.float16, shape=meta.shape
    )
    chunk = 20_000
    for start in tqdm(range(0, size.items, chunk), desc="features", unit="chunk"):
        n = min(chunk, size.items - start)
        rows = rng.standard_normal((n, GRID, GRID, size.feature_dim), dtype=np.float32) * 0.5
        top, left = rng.integers(0, GRID - 1, n), rng.integers(0, GRID - 1, n)
        pattern = patterns[kinds[start : start + n]]
        for dy in (0, 1):
            for dx in (0, 1):
                rows[np.arange(n), top + dy, left + dx] += pattern
        array[start : start + n] = rows.reshape(n, CELLS, -1)
    array.flush()
    del array
    (folder / META_FILE).write_text(meta.to_json())
    (folder / PROGRESS_FILE).write_text(
        json.dumps({"inputs_hash": meta.inputs_hash, "rows_done": size.items})
    )
    return kinds


def histories(size: WorldSize, rng: np.random.Generator) -> np.ndarray:
    """(users, per_user) item indices 1..N, oldest first."""
    per_kind = size.items // size.kinds
    weights = 1.0 / np.arange(1, per_kind + 1) ** 0.8  # long tail within a kind
    favourites = rng.integers(0, size.kinds, (size.users, 2))
    shape = (size.users, size.per_user)
    kind = np.where(
        rng.random(shape) < size.taste,
        favourites[np.arange(size.users)[:, None], rng.integers(0, 2, shape)],
        rng.integers(0, size.kinds, shape),
    )
    rank = rng.choice(per_kind, size=shape, p=weights / weights.sum())
    return rank * size.kinds + kind + 1  # item i + 1 has kind i % kinds


def build(work: Path, size: WorldSize, epochs: int, device: torch.device, seed: int = 0) -> None:
    """Features, a trained checkpoint (``acf.pt``) and the users' histories in ``work``."""
    rng = np.random.default_rng(seed)
    if not (work / PROGRESS_FILE).is_file():
        write_features(work, size, rng)
    items = histories(size, rng)
    (work / "histories.json").write_text(
        json.dumps({str(u): row.tolist() for u, row in enumerate(items)})
    )
    features, meta = load_features(work)
    config = TrainConfig(epochs=epochs)
    samples = build_samples(list(items), n_items=size.items, profile_size=config.profile_size)
    torch.manual_seed(seed)
    print(f"loading {features.shape} features for training ...", flush=True)
    model = ACF(
        config.acf_config(
            n_users=size.users, n_items=size.items, n_components=CELLS,
            feature_dim=size.feature_dim,
        ),
        torch.from_numpy(np.asarray(features, dtype=np.float32)),
    ).to(device)  # fmt: skip
    objective = Objective.create(config, samples, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        batches = epoch_batches(
            samples, config.batch_size, rng, run=config.sample_run, negatives=False
        )
        steps = -(-len(samples.users) // config.batch_size)
        for batch in tqdm(batches, total=steps, desc=f"epoch {epoch + 1}", unit="batch"):
            arrays = (batch.users, batch.profiles, batch.positives)
            tensors = (torch.as_tensor(a, device=device) for a in arrays)
            optimizer.zero_grad()
            objective(model.train(), (*tensors, torch.zeros(0, device=device)), gen).backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    print(f"trained {epochs} epoch(s) of {len(samples.users):,} samples in {seconds / 60:.1f} min")
    save_checkpoint(
        work / "acf.pt",
        Checkpoint(
            config=model.config,
            state={k: v.cpu() for k, v in model.state_dict().items()},
            user_ids=list(range(size.users)),
            item_ids=meta.item_ids,
            features={"inputs_hash": meta.inputs_hash, "backbone": meta.backbone},
            item_popularity=np.bincount(items.ravel(), minlength=size.items + 1)[1:].tolist(),
            train_config={"profile_size": config.profile_size, "epochs": epochs},
        ),
    )


# --------------------------------------------------------------------------- recall


def served_queries(work: Path, users: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors, queries of ``users`` real users) as the service computes them."""
    engine = load_engine(Source(work / "acf.pt", work), device=device)
    history = json.loads((work / "histories.json").read_text())
    chosen = list(history)[:users]
    profiles = np.array([history[u][-engine.profile_size :] for u in chosen])  # raw id = index
    user_rows = np.array([int(u) for u in chosen])
    return engine.serving.item_vectors, engine.serving.queries(user_rows, profiles)


def recall_table(label: str, vectors: np.ndarray, queries: np.ndarray, k: int = 20) -> None:
    """Recall@k against exact search and time per single query, per index kind."""
    print(f"{label}: {len(vectors):,} x {vectors.shape[1]} vectors, {len(queries)} queries")
    exact = ItemIndex(vectors, kind="flat").search(queries, k).items
    for kind in INDEX_KINDS:
        started = time.perf_counter()
        index = ItemIndex(vectors, kind=kind)
        built = time.perf_counter() - started
        started = time.perf_counter()
        found = np.concatenate([index.search(q[None], k).items for q in queries])
        per_query = (time.perf_counter() - started) / len(queries) * 1e3
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)])
        print(f"  {kind:5s} recall@{k} {recall:.3f}  {per_query:6.2f} ms per query  "
              f"(built in {built:5.1f} s)", flush=True)  # fmt: skip
        del index


# --------------------------------------------------------------------------- servers


def memory_gib(pid: int) -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / VmHWM (peak) of a process, GiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) / 2**20
    return fields


def serve_and_load(work: Path, kind: IndexKind, seconds: int) -> None:
    """One server over the catalogue with this index: start-up, memory, latency under wrk."""
    settings = {
        "VISREC_CHECKPOINT": str(work / "acf.pt"), "VISREC_FEATURES": str(work),
        "VISREC_INDEX": kind, "VISREC_DEVICE": "auto", "VISREC_ENVIRONMENT": "development",
        "VISREC_RATE_LIMIT_PER_S": "0",
    }  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    histories = work / "histories.json"
    tables = next((work / "serving").glob("*/tables.json"), None)
    kept = tables is not None and any(tables.parent.glob(f"index-{kind}-*"))
    started = time.perf_counter()
    cmd = [sys.executable, serve_load.__file__, "--serve", "ours", "--histories", str(histories)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env={**os.environ, **settings})
    try:
        wait_for(f"{url}/healthz", [proc], timeout_s=3600)
        took = time.perf_counter() - started
        how = "tables mapped" if tables else "tables computed and written"
        if kind != "flat":
            how += ", index read from the cache" if kept else ", index built and kept"
        at_start = memory_gib(proc.pid)
        print(f"{kind}: ready in {took:.1f} s ({how}); RSS {at_start['VmRSS']:.2f} GiB", flush=True)
        users = list(json.loads(histories.read_text()))
        script = recommend_script(users)
        for connections in (1, 16):
            print_load(f"GET /recommend ({kind})", wrk(url, script, connections=connections,
                                                       seconds=seconds))  # fmt: skip
        after = memory_gib(proc.pid)
        print("  memory after the load: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in after.items()),
              flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/million"))
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--queries", type=int, default=1000, help="for the recall")
    parser.add_argument(
        "--kinds",
        nargs="*",
        default=["flat", "hnsw", "ivf", "hnsw"],  # HNSW twice: built, then read from the cache
        choices=INDEX_KINDS,
        help="a server with each of these indexes, in this order",
    )
    parser.add_argument("--no-recall", dest="recall", action="store_false")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (or make bench-serve)")
    keep_freed_memory()
    device = pick_device("auto")  # the GPU when there is one (model and FAISS), as served
    where = "the CPU" if device.type == "cpu" else f"{device} (FAISS on the GPU: {gpu_available()})"
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, on {where}", flush=True)
    size = WorldSize(items=args.items, kinds=max(1, args.items // 1000))
    if not (args.work / "acf.pt").is_file():
        build(args.work, size, args.epochs, device)
    for kind in args.kinds:  # the first start writes the serving tables
        serve_and_load(args.work, kind, args.seconds)
    if args.recall:
        vectors, queries = served_queries(args.work, args.queries, device)
        recall_table("trained model", vectors, queries)
        rng = np.random.default_rng(0)
        recall_table(
            "random vectors (the hard case)",
            rng.standard_normal(vectors.shape, dtype=np.float32),
            rng.standard_normal(queries.shape, dtype=np.float32),
        )


if __name__ == "__main__":
    main()
