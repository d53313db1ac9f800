"""Data-parallel training over processes (``torchrun``), with torch.distributed.

Every process builds the same global batches from the same seeded generators and trains on its
own contiguous share of each one (runs of one user's samples stay together), and
``DistributedDataParallel`` averages the gradients, each process's loss being weighted by its
share so that the step is the one a single process takes on the whole batch. Rank 0 alone
validates (and tells the others the figures, so all of them stop at the same epoch), prints
and writes files.

    torchrun --nproc-per-node 2 -m service.offline.cli train DATA          # one machine
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 \\
        --nproc-per-node 4 -m service.offline.cli train DATA               # several machines

gloo on CPU, NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from service.model.acf import PAD
from service.offline.data.sampling import Batch


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment (nothing to do when
    there is none); returns the device this process trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def share(batch: Batch) -> tuple[Batch, float]:
    """This process's share of a global batch, and the weight of its mean loss such that the
    average over processes is the global batch's mean loss (weighted by positives: a row of
    every-position batches holds several, some rows fewer). A batch smaller than the number of
    processes is trained whole by each of them."""
    world = world_size()
    n = len(batch.users)
    if world == 1 or n < world:
        return batch, 1.0
    idx = np.array_split(np.arange(n), world)[dist.get_rank()]
    part = Batch(
        batch.users[idx],
        batch.profiles[idx],
        batch.positives[idx],
        batch.negatives[idx] if len(batch.negatives) else batch.negatives,
        batch.times[idx] if len(batch.times) else batch.times,
    )
    return part, _positives(part) * world / _positives(batch)


def _positives(batch: Batch) -> int:
    """How many positives a batch's mean loss is over (PAD marks none)."""
    return int(np.count_nonzero(batch.positives != PAD))


def total(values: list[float]) -> list[float]:
    """Element-wise sums over processes."""
    if not dist.is_initialized():
        return values
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return t.tolist()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
