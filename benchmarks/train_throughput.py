"""Training throughput of ACF: this project's way against the VisRec tutorial's, same process.

The tutorial gathers every sample's raw profile features from memory, (B, L, 49, C) floats, and
reduces them from scratch each step; the previous version of this project reduced the whole
catalogue once per step (N x 49 x C, shared by the batch). Here only the batch's distinct profile
items are reduced. All three compute the same loss on the same model and batches (tests check
that the user vectors agree); this script times them, then one full epoch of the default
configuration (centred, projected features and the softmax loss) and a full evaluation, and one
epoch of ACF (without and with context blocks) and of SASRec with every position of a row
trained in one pass against one pass per window.

Then the same default configuration on a generated catalogue of ``--items`` items (100,000) and
``--interactions`` interactions (1,000,000; 20 per user, popularity-skewed): random projected
features (N x 49 x 128, what the model sees after the projection), the softmax over 2,048
sampled negatives with logQ correction (the default above 10,000 items), timed per step this
project's way and the whole-catalogue way.

    .venv/bin/python benchmarks/train_throughput.py [DATA] [--batches 6] [--items 100000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from service.model.acf import ACF
from service.offline.data.dataset import load_dataset
from service.offline.data.features import extract_features
from service.offline.data.sampling import Batch, build_samples, epoch_batches
from service.offline.evaluation.evaluate import PROTOCOLS, evaluate, holdout_task
from service.offline.training.config import TrainConfig
from service.offline.training.objective import Objective, bpr_loss
from service.offline.training.pipeline import Prepared, fit, prepare
from service.offline.training.train import build_model
from service.runtime import keep_freed_memory

# The tutorial's model: raw features, the image only in the attention, BPR.
TUTORIAL = TrainConfig(
    visual="attention",
    loss="bpr",
    every_position=False,
    centre_components=False,
    feature_rank=0,
    recency=False,
    newest=False,
    batch_size=2048,
)


def _loss(model: ACF, batch: Batch, user: torch.Tensor) -> torch.Tensor:
    q = model.query_vectors(user)
    pos = (q * model.item_vectors(torch.as_tensor(batch.positives))).sum(-1)
    neg = (q * model.item_vectors(torch.as_tensor(batch.negatives))).sum(-1)
    return bpr_loss(pos, neg)


def tutorial_step(model: ACF, batch: Batch) -> torch.Tensor:
    """One loss the tutorial's way: raw features of each sample's profile, reduced per sample."""
    profiles = torch.as_tensor(batch.profiles)
    raw = model.features[profiles.flatten()]  # (B*L, K, C) gathered from memory
    tables = model.encode_items(raw)
    rows = torch.arange(profiles.numel()).view(profiles.shape)
    return _loss(
        model, batch, model.attend(torch.as_tensor(batch.users), profiles, tables, rows).user
    )


def catalogue_step(model: ACF, batch: Batch) -> torch.Tensor:
    """The previous way: the whole catalogue reduced once per step."""
    profiles = torch.as_tensor(batch.profiles)
    users = torch.as_tensor(batch.users)
    return _loss(model, batch, model.attend(users, profiles, model.catalogue_tables()).user)


def our_step(model: ACF, batch: Batch) -> torch.Tensor:
    """Only the batch's distinct profile items reduced."""
    users, profiles = torch.as_tensor(batch.users), torch.as_tensor(batch.profiles)
    return _loss(model, batch, model.attend_profiles(users, profiles).user)


Step = Callable[[ACF, Batch], torch.Tensor]


def samples_per_second(step: Step, model: ACF, batches: list[Batch]) -> tuple[float, list[float]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    step(model, batches[0]).backward()  # warm-up, not timed
    model.zero_grad()
    started = time.perf_counter()
    for batch in batches[1:]:
        optimizer.zero_grad()
        loss = step(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    return sum(len(b.users) for b in batches[1:]) / seconds, losses


def large_catalogue(n_items: int, n_interactions: int, n_batches: int) -> None:
    """Samples/s of the default configuration on a generated catalogue of ``n_items``."""
    config = TrainConfig()
    rng = np.random.default_rng(0)
    per_user, dim, grid = 20, config.feature_rank, 49
    n_users = n_interactions // per_user
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8  # a long tail, as real catalogues have
    items = rng.choice(
        np.arange(1, n_items + 1), size=(n_users, per_user), p=weights / weights.sum()
    )
    samples = build_samples(list(items), n_items=n_items, profile_size=config.profile_size)
    features = torch.randn(n_items, grid, dim, generator=torch.Generator().manual_seed(0))
    acf = ACF(config.acf_config(n_users=n_users, n_items=n_items, n_components=grid,
                                feature_dim=dim), features)  # fmt: skip
    objective = Objective.create(config, samples, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batches = epoch_batches(samples, config.batch_size, rng, run=config.sample_run, negatives=False)
    print(
        f"\n{n_items} items x {grid} x {dim}, {len(samples.users)} samples of {n_users} users, "
        f"batch {config.batch_size}, softmax over {config.negatives} sampled negatives, on the CPU"
    )

    def ours(model: ACF, batch: Batch) -> torch.Tensor:
        tensors = tuple(torch.as_tensor(a) for a in (batch.users, batch.profiles, batch.positives))
        return objective(model, (*tensors, torch.zeros(0)), gen)

    def whole(model: ACF, batch: Batch) -> torch.Tensor:
        users, profiles = torch.as_tensor(batch.users), torch.as_tensor(batch.profiles)
        user = model.attend(users, profiles, model.catalogue_tables()).user
        return objective._sampled_softmax(  # the same loss on the same user vectors
            model.query_vectors(user), torch.as_tensor(batch.positives), model.item_vectors, gen
        )

    taken = [next(batches) for _ in range(n_batches + 1)]
    rate, _ = samples_per_second(ours, acf, taken)
    slow, _ = samples_per_second(whole, acf, taken[:3])  # a step takes seconds: two are timed
    print(
        f"ours      {rate:9.0f} samples/s, an epoch of {len(samples.users)} samples in "
        f"{len(samples.users) / rate / 60:.1f} min"
    )
    print(f"catalogue {slow:9.0f} samples/s  -> ours is {rate / slow:.0f}x")


def every_position(prepared: Prepared) -> None:
    """One epoch of ACF (the default, and the plan's: two context blocks) and of SASRec batched
    both ways: one pass per window, and every position of a row in one pass
    (``every_position``); positives per second."""
    positives = len(prepared.split.train_items)
    rows = {
        "acf": TrainConfig(),
        "acf, 2 context blocks": TrainConfig(context_blocks=2),
        "sasrec": TrainConfig(model="sasrec"),
    }
    for name, row in rows.items():
        seconds = {}
        for every in (False, True):
            config = replace(row, epochs=1, every_position=every)
            result = fit(prepared, config, device=torch.device("cpu"), progress=False)
            seconds[every] = result.history[0]["seconds"]
        print(
            f"{name:21s} one epoch: a pass per window {positives / seconds[False]:6.0f} "
            f"positives/s, every position in one pass {positives / seconds[True]:6.0f} "
            f"positives/s ({seconds[False] / seconds[True]:.1f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/datasets/ml100k"))
    parser.add_argument("--features", type=Path)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--items", type=int, default=100_000, help="0: skip the large catalogue")
    parser.add_argument("--interactions", type=int, default=1_000_000)
    args = parser.parse_args()
    keep_freed_memory()
    features = (
        args.features or Path("runs") / args.data.resolve().name / "features-efficientnet_lite0"
    )
    dataset = load_dataset(args.data)
    extract_features(dataset.item_ids.tolist(), list(dataset.image_paths), features)  # once
    prepared = prepare(args.data, features)
    split = prepared.split
    samples = build_samples(split.train_sequences(), n_items=split.n_items, profile_size=9)
    rng = np.random.default_rng(0)
    batches = list(epoch_batches(samples, TUTORIAL.batch_size, rng, run=TUTORIAL.sample_run))
    batches = batches[: args.batches + 1]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
        f"{TUTORIAL.batch_size}, {split.n_items} items x 49 x {prepared.features.shape[2]}"
    )

    rates = {}
    steps = (("tutorial", tutorial_step), ("catalogue", catalogue_step), ("ours", our_step))
    for name, step in steps:
        model = build_model(TUTORIAL, split, prepared.features)
        assert isinstance(model, ACF)
        rates[name], losses = samples_per_second(step, model, batches)
        print(
            f"{name:9s} {rates[name]:9.0f} samples/s  (losses {losses[0]:.5f} .. {losses[-1]:.5f})"
        )
    print(
        f"speed-up: {rates['ours'] / rates['tutorial']:.1f}x the tutorial's, "
        f"{rates['ours'] / rates['catalogue']:.1f}x the whole-catalogue step"
    )

    started = time.perf_counter()
    result = fit(
        prepared, replace(TrainConfig(), epochs=1), device=torch.device("cpu"), progress=False
    )
    epoch = result.history[0]
    print(
        f"default configuration, one epoch of {len(samples.users)} samples: "
        f"{epoch['seconds']:.1f} s ({len(samples.users) / epoch['seconds']:.0f} samples/s; "
        f"with the projection and validation {time.perf_counter() - started:.1f} s)"
    )
    for protocol in PROTOCOLS:
        started = time.perf_counter()
        evaluate(result.model, holdout_task(split, protocol), device=torch.device("cpu"))  # type: ignore[arg-type]
        print(
            f"evaluation, {protocol}: {len(split.test_users)} users x {split.n_items} items "
            f"in {time.perf_counter() - started:.2f} s"
        )
    every_position(prepared)
    if args.items:
        large_catalogue(args.items, args.interactions, args.batches * 3)


if __name__ == "__main__":
    main()
