"""The diversity re-rank measured offline: what ``diversity`` costs in R@20 and nDCG@20 and
what it buys in intra-list similarity, on the ``standard`` protocol, through the engine the
service serves.

The plan's ``acf`` row (``configs/reproduce.toml``, seed 0) is trained on DATA's training
split; every test user is then asked for their top 20 as ``GET /recommend`` would ask
(``Recommender.recommend``: their last 9 training items as the profile, every training and
validation item removed), at each ``--settings`` value of ``diversity``. Intra-list similarity
(ILS@20) is the mean cosine between the item vectors of a list's items, each pair once (the
vectors the re-rank reads). Intervals: paired bootstrap over users against ``diversity`` 0.
It prints the table and writes it to ``--out``.

    .venv/bin/python -m benchmarks.diversity [DATA] [--features F] [--settings 0,0.25,0.5,0.75]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from service.diversity import intra_list_similarity
from service.engine import build_engine
from service.model.acf import PAD
from service.offline.evaluation.evaluate import Task, holdout_task
from service.offline.evaluation.metrics import paired_bootstrap
from service.offline.experiments.plan import load_plan
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.recommender import Query, Recommender

K = 20


def measure(
    engine: Recommender, task: Task, item_ids: np.ndarray, user_ids: np.ndarray, diversity: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per test user: hit@20, nDCG@20 and ILS@20 of the engine's answer."""
    queries = []
    for u, (user, profile) in enumerate(zip(task.users, task.profiles, strict=True)):
        removed = task.exclude.indices[task.exclude.indptr[u] : task.exclude.indptr[u + 1]]
        history = item_ids[profile[profile != PAD] - 1].tolist()
        exclude = set(item_ids[removed].tolist())  # columns 0..N-1
        queries.append(Query(str(user_ids[user]), history, exclude, K, diversity=diversity))
    index = {int(raw): i + 1 for i, raw in enumerate(engine.item_ids.tolist())}
    hits, gains, ils = [], [], []
    for start in range(0, len(queries), 256):
        answers = engine.recommend(queries[start : start + 256])
        for answer, target in zip(answers, task.targets[start : start + 256], strict=True):
            items = answer.items
            wanted = int(item_ids[target - 1])
            rank = items.index(wanted) if wanted in items else None
            hits.append(rank is not None)
            gains.append(0.0 if rank is None else 1 / np.log2(rank + 2))
            indices = np.array([index[i] for i in items])
            ils.append(intra_list_similarity(engine.serving.item_vectors[indices - 1]))
    return np.array(hits, float), np.array(gains), np.array(ils)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--features", type=Path)
    parser.add_argument("--settings", default="0,0.25,0.5,0.75")
    parser.add_argument("--out", type=Path, default=Path("docs/diversity.md"))
    args = parser.parse_args()
    features = args.features or Path("runs") / args.data.name / "features-efficientnet_lite0"
    prepared = prepare(args.data, features)
    config = load_plan(Path("configs/reproduce.toml")).row("acf").config
    started = time.perf_counter()
    result = fit(prepared, config, device=torch.device("cpu"), progress=True)
    trained = time.perf_counter() - started
    meta = prepared.meta
    engine = build_engine(
        to_checkpoint(prepared, result, config),
        np.asarray(prepared.features),
        inputs_hash=meta.inputs_hash,
        item_ids=meta.item_ids,
        device=torch.device("cpu"),
    )
    task = holdout_task(prepared.split, "standard")
    item_ids, user_ids = prepared.dataset.item_ids, prepared.dataset.user_ids
    rows, base = [], None
    rng = np.random.default_rng(0)
    for setting in [float(s) for s in args.settings.split(",")]:
        hits, gains, ils = measure(engine, task, item_ids, user_ids, setting)
        base = base or (hits, gains, ils)
        delta = paired_bootstrap(gains, base[1], rng=rng)
        rows.append(
            f"| {setting:.2f} | {hits.mean():.4f} | {gains.mean():.4f} | "
            f"{delta.mean:+.4f} [{delta.low:+.4f}, {delta.high:+.4f}] | {ils.mean():.3f} |"
        )
    table = "\n".join(
        [
            f"`diversity` on `standard` ({args.data.name}, {len(task.users)} test users; the "
            f"plan's `acf` row, seed 0, trained in {trained:.0f} s; "
            "`benchmarks/diversity.py`):",
            "",
            "| diversity | R@20 | nDCG@20 | nDCG@20 − at 0 [95%] | ILS@20 (mean cosine) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    args.out.write_text(f"# The diversity re-rank, measured offline\n\n{table}\n")


if __name__ == "__main__":
    main()
