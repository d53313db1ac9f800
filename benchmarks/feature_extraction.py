"""Feature extraction throughput on generated images, as `visrec features` runs it.

Generates ``--images`` synthetic item images (112 px PNGs with shapes, as the synthetic world
draws them), then extracts their component features once per ``--workers`` setting (DataLoader
processes decoding and preprocessing while the network runs) and prints images/s, with the
ratio against the first setting, measured in this one process one after the other.

    .venv/bin/python benchmarks/feature_extraction.py [--images 10000] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from service.model.backbones import DEFAULT_BACKBONE
from service.offline.data.dataset import load_dataset
from service.offline.data.features import extract_features
from service.offline.data.synthetic import WorldSpec, make_world
from service.runtime import pick_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        spec = WorldSpec(n_users=2, n_items=args.images, interactions_per_user=2, clutter=2)
        make_world(Path(tmp) / "world", spec)
        data = load_dataset(Path(tmp) / "world")
        print(
            f"{args.images} images generated in {time.perf_counter() - started:.0f} s; "
            f"{args.backbone}, batch {args.batch_size}, on {device} "
            f"({torch.get_num_threads()} threads)"
        )
        rates: list[float] = []
        for workers in args.workers:
            started = time.perf_counter()
            extract_features(
                data.item_ids.tolist(),
                list(data.image_paths),
                Path(tmp) / f"features-{workers}",
                backbone=args.backbone,
                batch_size=args.batch_size,
                device=device,
                num_workers=workers,
            )
            rates.append(args.images / (time.perf_counter() - started))
            print(
                f"workers {workers}: {rates[-1]:6.1f} images/s "
                f"({rates[-1] / rates[0]:.2f}x workers {args.workers[0]})"
            )


if __name__ == "__main__":
    main()
