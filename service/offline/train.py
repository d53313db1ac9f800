"""Pairwise training of ACF and the baselines, with validation after every epoch."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from service.model.acf import ACF, ACFConfig
from service.offline.attention import LEVELS, Probe, attention_stats, flat_levels
from service.offline.baselines import BPRMF, VBPR, Popularity
from service.offline.data import Split
from service.offline.evaluate import Task, evaluate
from service.offline.sampling import Batch, Samples, epoch_batches
from service.runtime import bar_interval

ModelName = Literal["acf", "acf_mean_pool", "bpr_mf", "vbpr", "popularity"]
MODELS: tuple[ModelName, ...] = ("acf", "popularity", "bpr_mf", "vbpr", "acf_mean_pool")
SELECTION_METRIC = "nDCG@20"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; all of it is stored in the checkpoint.

    The defaults differ from the VisRec tutorial's ACF (``configs/tutorial.toml``) where a
    measurement on ml100k said so: the score is not divided by the model dim and items have a
    bias. With the 1/dim scale, scores start near zero and Adam needs many epochs to grow the
    embeddings: validation nDCG@20 stayed at 0.054-0.055 over 4-6 epochs (lr 1e-3 and 5e-3),
    while scale 1 with an item bias passed 0.10 (docs/results.md has the full runs).
    """

    model: ModelName = "acf"
    dim: int = 64
    attention_dim: int = 64
    epochs: int = 40
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-5  # L2; the tutorial found 0 < λ < 1e-4 necessary, 1e-5 best
    loss: Literal["bpr", "warp"] = "bpr"
    profile_size: int = 9
    # Batches are made of shuffled runs of this many consecutive samples of one user: their
    # profiles overlap, so ACF computes component attention for far fewer (user, item) pairs.
    sample_run: int = 16
    tied: bool = True
    item_term: bool = False
    item_bias: bool = True
    score_scale: float | None = 1.0  # None: 1 / dim, as in the tutorial
    patience: int = 10  # stop after this many epochs without a better validation nDCG@20
    seed: int = 0

    def __post_init__(self) -> None:
        positive = (
            "dim",
            "attention_dim",
            "epochs",
            "batch_size",
            "lr",
            "profile_size",
            "sample_run",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) <= 0]
        if self.weight_decay < 0 or self.patience < 0:
            bad.append(f"weight_decay={self.weight_decay}, patience={self.patience}")
        if self.model not in MODELS or self.loss not in ("bpr", "warp"):
            bad.append(f"model={self.model!r}, loss={self.loss!r}")
        if bad:
            raise ValueError(f"invalid training setting(s): {'; '.join(bad)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown training setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**values)

    def acf_config(
        self, *, n_users: int, n_items: int, n_components: int, feature_dim: int
    ) -> ACFConfig:
        return ACFConfig(
            n_users=n_users,
            n_items=n_items,
            feature_dim=feature_dim,
            n_components=n_components,
            dim=self.dim,
            attention_dim=self.attention_dim,
            tied=self.tied,
            item_term=self.item_term,
            item_bias=self.item_bias,
            component_pool="mean" if self.model == "acf_mean_pool" else "attention",
            score_scale=self.score_scale,
        )


@dataclass
class TrainResult:
    model: nn.Module  # with the best epoch's weights
    best_epoch: int  # 1-based; 0 when the model has nothing to train
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def validation(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1] if self.best_epoch else {}


def build_model(config: TrainConfig, split: Split, features: np.ndarray) -> nn.Module:
    """A freshly initialised model, seeded by ``config.seed``; ``features`` (N, K, C)."""
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))  # a writable copy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.model in ("acf", "acf_mean_pool"):
            n, k, c = feats.shape
            return ACF(
                config.acf_config(n_users=split.n_users, n_items=n, n_components=k, feature_dim=c),
                feats,
            )
        if config.model == "bpr_mf":
            return BPRMF(split.n_users, split.n_items, config.dim)
        if config.model == "vbpr":
            return VBPR(split.n_users, feats, config.dim)
        if config.model == "popularity":
            return Popularity(split.train_items, split.n_items)
    raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    return -F.logsigmoid(pos - neg).mean()


def warp_loss(pos: Tensor, neg: Tensor, margin: float = 1.0) -> Tensor:
    """The VisRec tutorial's batch WARP-like loss: violations weighted by log(#violations)."""
    soft = torch.sigmoid(neg - pos + margin)
    violated = (soft > 0.5).float()
    weight = violated * (torch.log(violated.sum() + 1) + 1)
    return (weight * soft).mean()


LOSSES = {"bpr": bpr_loss, "warp": warp_loss}


def train(
    model: nn.Module,
    samples: Samples,
    validation: Task,
    config: TrainConfig,
    *,
    device: torch.device,
    rng: np.random.Generator,
    probe: Probe | None = None,
    progress: bool = True,
) -> TrainResult:
    """Adam on the pairwise loss; keeps the weights of the epoch with the best validation
    nDCG@20 (not the lowest loss) and stops after ``patience`` epochs without improvement.

    With a ``probe``, every epoch's row of the history also holds ACF's attention statistics
    (:func:`~service.offline.attention.attention_stats`), and a warning is logged when the kept
    epoch's attention is flat."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return TrainResult(model.eval(), 0, [])  # nothing to train (popularity)
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict[str, float]] = []
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        loss = _run_epoch(
            model,
            optimizer,
            samples,
            config,
            device=device,
            rng=rng,
            desc=f"{config.model} epoch {epoch}/{config.epochs}",
            progress=progress,
        )
        row = {
            "epoch": float(epoch),
            "loss": loss,
            "seconds": time.perf_counter() - started,
            **_validate(model, validation, device),
        }
        if probe is not None and isinstance(model, ACF):
            row |= attention_stats(model, probe)
        history.append(row)
        best = max(h[SELECTION_METRIC] for h in history)
        if row[SELECTION_METRIC] >= best:
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
        if progress:
            tqdm.write(
                f"{config.model} epoch {epoch}: loss {loss:.4f}  "
                f"val nDCG@20 {row['nDCG@20']:.4f}  R@20 {row['R@20']:.4f}  "
                f"{_attention_note(row)}({row['seconds']:.1f} s)"
            )
        if config.patience and epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    _warn_if_flat(config.model, history[best_epoch - 1], best_epoch)
    return TrainResult(model.eval(), best_epoch, history)


def _attention_note(row: dict[str, float]) -> str:
    parts = [f"{level} {row[key]:.3f}" for level, key in LEVELS.items() if key in row]
    return f"attention entropy {', '.join(parts)}  " if parts else ""


def _warn_if_flat(model: str, row: dict[str, float], epoch: int) -> None:
    for level in flat_levels(row):
        log.warning(
            "%s: %s-level attention is flat at the kept epoch %d (normalised entropy %.3f; "
            "1.0 = uniform weights): the known failure of ACF without regularisation, the "
            "%s are averaged rather than attended",
            model,
            level,
            epoch,
            row[LEVELS[level]],
            "profile items" if level == "item" else "image components",
        )


def _run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Samples,
    config: TrainConfig,
    *,
    device: torch.device,
    rng: np.random.Generator,
    desc: str,
    progress: bool,
) -> float:
    model.train()
    loss_fn = LOSSES[config.loss]
    total, seen = 0.0, 0
    n_batches = -(-len(samples.users) // config.batch_size)
    bar = tqdm(
        epoch_batches(samples, config.batch_size, rng, run=config.sample_run),
        total=n_batches,
        desc=desc,
        unit="batch",
        disable=not progress,
        leave=False,
        mininterval=bar_interval(),
    )
    for batch in bar:
        users, profiles, pos, neg = _to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*model(users, profiles, pos, neg))
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch.users)
        seen += len(batch.users)
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    return total / seen


def _to_device(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    arrays = (batch.users, batch.profiles, batch.positives, batch.negatives)
    return tuple(torch.as_tensor(a, device=device) for a in arrays)  # type: ignore[return-value]


def _validate(model: nn.Module, task: Task, device: torch.device) -> dict[str, float]:
    model.eval()
    table = evaluate(model, task, device=device)  # type: ignore[arg-type]
    return {"nDCG@20": float(table["nDCG@20"].mean()), "R@20": float(table["R@20"].mean())}
