"""What the softmax loss costs per training step, over the whole catalogue or sampled.

The training objective (``service/offline/training/train.py``, :class:`Objective`) scores every item
for every sample of a batch when the catalogue has at most ``full_softmax_items`` items, and
``negatives`` popularity-drawn items with logQ correction above. This script times one Adam
step of each, same process, on an inner-product model (BPR-MF: the loss side of any of our
models), for catalogues of growing size, and prints the milliseconds and their ratio. The
threshold in ``TrainConfig.full_softmax_items`` is read off this table: the catalogue size
where the whole-catalogue step starts costing several times the sampled one.

    .venv/bin/python benchmarks/softmax_cost.py [--sizes 2000 10000 ...] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from service.offline.training.baselines import BPRMF
from service.offline.training.config import TrainConfig
from service.offline.training.objective import Objective


def step_ms(n_items: int, sampled: bool, config: TrainConfig, steps: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    model = BPRMF(n_users=1000, n_items=n_items, dim=config.dim)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    popularity = 1.0 / np.arange(1, n_items + 1)  # Zipf-like draws, as real catalogues have
    q = torch.as_tensor(np.concatenate([[0.0], popularity / popularity.sum()]), dtype=torch.float32)
    objective = Objective(
        loss="softmax",
        sampled=sampled,
        negatives=config.negatives,
        log_q=q.log(),
        profile_dropout=0.0,
        entropy_bonus=0.0,
    )
    b = config.batch_size
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        batch = (
            torch.randint(0, 1000, (b,), generator=gen),
            torch.zeros(b, config.profile_size, dtype=torch.long),
            torch.randint(1, n_items + 1, (b,), generator=gen),
            torch.randint(1, n_items + 1, (b,), generator=gen),
        )
        started = time.perf_counter()
        optimiser.zero_grad()
        objective(model, batch, gen).backward()
        optimiser.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 10_000, 20_000, 50_000])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = TrainConfig()
    print(
        f"one Adam step, batch {config.batch_size}, dim {config.dim}, "
        f"{config.negatives} sampled negatives, {torch.get_num_threads()} threads, CPU"
    )
    print(f"{'items':>8} {'whole ms':>9} {'sampled ms':>11} {'ratio':>6}")
    for n in args.sizes:
        whole = step_ms(n, False, config, args.steps, seed=0)
        sampled = step_ms(n, True, config, args.steps, seed=0)
        print(f"{n:>8} {whole:>9.1f} {sampled:>11.1f} {whole / sampled:>6.2f}")


if __name__ == "__main__":
    main()
