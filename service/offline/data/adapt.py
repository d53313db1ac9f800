"""The backbone's last stage fitted to a catalogue's posters (issue 21: "better visual features
where they pay").

ImageNet features describe objects, not what a poster says about a film's audience. This fits
EfficientNet-Lite0's last block and head convolution (the layers that make the 7x7 grid ACF
reads; 1.0M of its 3.4M parameters) to a signal the warm items carry offline, and writes the
whole network in the shipped weights' format, so ``extract_features(weights=...)`` and
``load_backbone(weights=...)`` (what ``POST /items`` runs) use it as they use the shipped one:

- ``genres``: the item's genres, multi-label (binary cross-entropy on the pooled grid);
- ``taste``: the item's direction in the training interactions (a truncated SVD of the
  item-user matrix, rows normalised), by cosine: who chose it, which metadata does not say.

The layers before are frozen, so their output is computed once per poster; batch norm keeps
its ImageNet statistics (its scale and shift are trained). A linear read-out of the shipped
grid is fitted first (the baseline), then the stage with it; ``held_out`` of the items are
kept out of both, and the epoch with the lowest loss on them is the one written (none, and the
weights stay as shipped, if no epoch beats the read-out).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import svds
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from service.files import write_atomically
from service.model.backbones import SPECS, load_backbone
from service.offline.data.dataset import Dataset, Split
from service.offline.data.features import ImageDataset
from service.runtime import bar_interval

Target = Literal["genres", "taste"]
BACKBONE = "efficientnet_lite0"  # the one whose stages are named here
FEATURE_DIM = SPECS[BACKBONE].feature_dim


@dataclass(frozen=True)
class AdaptConfig:
    target: Target = "genres"
    epochs: int = 20
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    held_out: float = 0.1  # share of the items the best epoch is chosen on
    taste_dim: int = 32
    min_interactions: int = 5  # items with fewer have no taste target
    seed: int = 0


@dataclass(frozen=True)
class Adapted:
    weights: Path
    best_epoch: int  # 0: no epoch beat a read-out of the shipped grid (the weights are as shipped)
    held_loss: tuple[float, float]  # held-out loss: a read-out of the shipped grid, the fitted
    items: int  # items fitted (held-out ones excluded)
    seconds: float


def genre_targets(genres: Sequence[frozenset[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, G) multi-hot genres and (N,) whether an item has any."""
    names = sorted(set().union(*genres))
    if not names:
        raise ValueError("no item has genres: adapt on the 'taste' target instead")
    column = {g: j for j, g in enumerate(names)}
    out = np.zeros((len(genres), len(names)), dtype=np.float32)
    for i, item in enumerate(genres):
        out[i, [column[g] for g in item]] = 1.0
    return out, np.asarray(out.any(1))


def taste_targets(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, *, dim: int, least: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, dim) unit vectors of items 1..N in the item-user matrix of ``(users, items)`` (rows
    normalised, truncated SVD), and (N,) whether an item has ``least`` interactions or more."""
    matrix = csr_matrix(
        (np.ones(len(users), dtype=np.float32), (items - 1, users)), shape=(n_items, n_users)
    )
    counts = np.asarray(matrix.sum(1)).ravel()
    scaled = csr_matrix(matrix.multiply(1.0 / np.sqrt(np.maximum(counts, 1))[:, None]))
    left, sizes, _ = svds(scaled, k=min(dim, min(matrix.shape) - 1), random_state=0)
    vectors = (left * sizes).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors, counts >= least


def fit_to(
    dataset: Dataset, split: Split, out: Path, config: AdaptConfig, *, progress: bool = True
) -> Adapted:
    """Fit the last stage on ``dataset``'s posters to their ``config.target`` (``taste`` from
    the training part of ``split`` only) and write the weights to ``out``."""
    if config.target == "genres":
        targets, keep = genre_targets(dataset.genres)
    else:
        targets, keep = taste_targets(
            split.train_users,
            split.train_items,
            split.n_users,
            split.n_items,
            dim=config.taste_dim,
            least=config.min_interactions,
        )
    paths = [p for p, k in zip(dataset.image_paths, keep, strict=True) if k]
    return adapt_backbone(paths, targets[keep], out, config, progress=progress)


def adapt_backbone(
    image_paths: Sequence[Path],
    targets: np.ndarray,
    out: Path,
    config: AdaptConfig,
    *,
    progress: bool = True,
) -> Adapted:
    """Fit the last stage to ``targets`` (one row per image, as :func:`genre_targets` or
    :func:`taste_targets` give, for the items to fit on only) and write the weights to
    ``out``."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    net = load_backbone(BACKBONE).module.get_submodule("net")
    stage = _Stage(net, targets.shape[1])
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(targets))
    n_held = max(1, round(config.held_out * len(targets)))
    fitting = _Fitting(
        stage,
        _loss(config.target),
        _frozen_part(net, image_paths, progress=progress),
        torch.from_numpy(targets),
        held=order[:n_held],
        fit=order[n_held:],
        rng=rng,
        config=config,
    )
    stage.fitting(False)  # first a linear read-out of the shipped grid: the baseline
    shipped, _ = fitting.run("read-out", progress=progress)
    stage.fitting(True)
    kept, best_epoch = fitting.run("adapt", progress=progress, baseline=shipped)
    write_atomically(out, lambda tmp: torch.save(net.state_dict(), tmp))
    seconds = time.perf_counter() - started
    return Adapted(out, best_epoch, (shipped, kept), len(order) - n_held, seconds)


@dataclass
class _Fitting:
    stage: _Stage
    loss: nn.Module
    inputs: torch.Tensor  # (N, C, 7, 7): what the last block reads
    targets: torch.Tensor
    held: np.ndarray
    fit: np.ndarray
    rng: np.random.Generator
    config: AdaptConfig

    def run(
        self, what: str, *, progress: bool, baseline: float = float("inf")
    ) -> tuple[float, int]:
        """Train what requires grad for the configured epochs; keep the epoch with the lowest
        held-out loss (none, if ``baseline`` is lower): (that loss, that epoch or 0)."""
        config, stage = self.config, self.stage
        params = [p for p in stage.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        best, best_epoch, kept = baseline, 0, copy.deepcopy(stage.state_dict())
        for epoch in tqdm(range(1, config.epochs + 1), desc=what, disable=not progress):
            for batch in torch.from_numpy(self.rng.permutation(self.fit)).split(config.batch_size):
                optimiser.zero_grad()
                self.loss(stage(self.inputs[batch]), self.targets[batch]).backward()
                optimiser.step()
            with torch.no_grad():
                now = float(self.loss(stage(self.inputs[self.held]), self.targets[self.held]))
            if now < best:
                best, best_epoch, kept = now, epoch, copy.deepcopy(stage.state_dict())
        stage.load_state_dict(kept)
        return best, best_epoch


class _Stage(nn.Module):
    """The backbone's last block and head (shared with ``net``: fitting them changes it) and
    a linear read-out of the pooled grid."""

    def __init__(self, net: nn.Module, outputs: int) -> None:
        super().__init__()
        self.block = _blocks(net)[-1]
        self.head, self.norm = net.get_submodule("_conv_head"), net.get_submodule("_bn1")
        self.act = net.get_submodule("_swish")
        self.readout = nn.Linear(FEATURE_DIM, outputs)
        for p in net.parameters():
            p.requires_grad_(False)

    def fitting(self, backbone: bool) -> None:
        """Train the backbone's stage too (else the read-out alone)."""
        for p in [*self.block.parameters(), *self.head.parameters(), *self.norm.parameters()]:
            p.requires_grad_(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.act(self.norm(self.head(self.block(x))))
        return self.readout(grid.mean((2, 3)))


def _frozen_part(net: nn.Module, paths: Sequence[Path], *, progress: bool) -> torch.Tensor:
    """The input of the last block for each image, computed once: (N, C, 7, 7)."""
    spec = SPECS[BACKBONE]
    loader = DataLoader(
        ImageDataset(paths, input_size=spec.input_size, mean=spec.mean, std=spec.std),
        batch_size=32,
    )
    stem = nn.Sequential(
        net.get_submodule("_conv_stem"), net.get_submodule("_bn0"), net.get_submodule("_swish")
    )
    blocks = _blocks(net)[:-1]
    net.eval()
    out = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="posters", disable=not progress, mininterval=bar_interval()):
            x = stem(batch)
            for block in blocks:  # drop-connect is off in eval mode
                x = block(x)
            out.append(x)
    return torch.cat(out).clone()  # out of inference mode: a plain tensor to train on


def _blocks(net: nn.Module) -> list[nn.Module]:
    return list(cast(nn.ModuleList, net.get_submodule("_blocks")))


def _loss(target: Target) -> nn.Module:
    return nn.BCEWithLogitsLoss() if target == "genres" else _CosineLoss()


class _CosineLoss(nn.Module):
    def forward(self, predicted: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(predicted, wanted, dim=1)).mean()
