"""Training of ACF and the baselines, with validation after every epoch.

Every trained model is an inner-product model: ``queries(users, profiles) -> (B, D')`` against
``item_vectors(items) -> (M, D')``. The losses only need those two:

- ``softmax``: cross-entropy of the positive against the whole catalogue (one positive per
  sample, every other item a negative). Above ``full_softmax_items`` items the catalogue is
  sampled instead: ``negatives`` items drawn from the training popularity, shared by the batch,
  with the log-probability of being drawn subtracted from each logit (logQ correction, so the
  sampled loss estimates the full one rather than over-penalising popular items).
- ``bpr``, ``warp``: pairwise, against one uniformly drawn unseen item per positive (the VisRec
  tutorial's objectives).

The default is the softmax: ``docs/sweep.md`` has ACF's validation nDCG@20 with each loss.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from service.model.acf import ACF, PAD, UNKNOWN_USER, ACFConfig, Visual
from service.model.projection import Projection
from service.model.sasrec import SASRec, SASRecConfig
from service.model.tags import tag_rows, vocabulary
from service.offline import distributed
from service.offline.attention import LEVELS, Probe, attention_stats, flat_levels
from service.offline.baselines import BPRMF, EASE, VBPR, Popularity, Transitions
from service.offline.data import Split
from service.offline.evaluate import Task, evaluate
from service.offline.sampling import (
    Batch,
    Samples,
    chunk_batches,
    epoch_batches,
    rows_per_batch,
    sequence_chunks,
)
from service.runtime import bar_interval, subnormals_flushed

ModelName = Literal["acf", "sasrec", "bpr_mf", "vbpr", "ease", "transitions", "popularity"]
MODELS: tuple[ModelName, ...] = (
    "acf",
    "sasrec",
    "transitions",
    "ease",
    "bpr_mf",
    "vbpr",
    "popularity",
)
LossName = Literal["softmax", "bpr", "warp"]
LOSS_NAMES: tuple[LossName, ...] = ("softmax", "bpr", "warp")
# Epochs and settings are chosen on the mean of validation nDCG@20 under both protocols (see
# :mod:`service.offline.evaluate`): the page compares models under both, so choosing on one
# would tune every model for half of what is reported.
SELECTION_METRIC = "mean nDCG@20"
# The served row is chosen on `standard` validation alone: it is what the service does (the
# last 9 items as profile, everything the user has seen left out).
SERVING_METRIC = "nDCG@20"

POOLS = ("attention", "mean")
CHOICES = {"visual": get_args(Visual), "component_pool": POOLS, "item_pool": POOLS}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; all of it is stored in the checkpoint.

    One flat set of settings for every model; each model reads the ones it has (``dim`` is
    everyone's, ``ease_l2`` only EASE's). The defaults are this project's ACF: softmax loss,
    the image reaching the score, centred and projected components, recency in the item
    attention. ``configs/tutorial.toml`` gives the VisRec tutorial's ACF.
    """

    model: ModelName = "acf"
    dim: int = 64
    attention_dim: int = 64
    epochs: int = 40
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5  # L2 (Adam's); the tutorial found 0 < λ < 1e-4 necessary
    loss: LossName = "softmax"
    negatives: int = 2048  # sampled softmax: catalogue items drawn per batch
    # Above this many items, softmax samples its negatives. `benchmarks/softmax_cost.py` (2-core
    # CPU, batch 512, dim 64): the whole-catalogue loss step took 5.1 / 26.5 / 75.8 / 187 ms at
    # 2k / 10k / 20k / 50k items against 7.5 / 8.9 / 11.8 / 20.8 ms sampled; at 10k it is 3x the
    # sampled one and as much as the rest of an ACF step (~31 ms on ml100k), so it stops there.
    full_softmax_items: int = 10_000
    profile_size: int = 9
    # Batches are made of shuffled runs of this many consecutive samples of one user: their
    # profiles overlap, so ACF computes component attention for far fewer (user, item) pairs.
    sample_run: int = 16
    # ACF and SASRec (softmax loss): every position of a stretch of profile_size + 1 items of a
    # user trained in one pass (sampling.chunk_batches), as SASRec is, instead of one pass per
    # window. Validation, 3 seeds, ACF with context blocks: nDCG@20 0.1547 against 0.1586 a
    # pass per window, ~10 s an epoch against 17.6 s (README). Other models: a pass per window.
    every_position: bool = False
    profile_dropout: float = 0.0  # training: each profile item is hidden with this probability
    # ACF
    visual: Visual = "score"
    component_pool: Literal["attention", "mean"] = "attention"
    # How a candidate's own image vector pools its components (ACFConfig.item_pool). The
    # attention, measured on validation (3 seeds; README, "The model"): +0.090 precision@20 on
    # new items where distractors are as large as the object, level with the mean elsewhere
    # (ml100k: -0.004 R@20 [-0.019, +0.011], at 1.8x the training time), and flatter component
    # attention on the profile side; so the mean stays the default.
    item_pool: Literal["mean", "attention"] = "mean"
    recency: bool = True  # learned vectors per profile position in the item attention
    newest: bool = True  # the item attention is also conditioned on the newest profile item
    centre_components: bool = True  # subtract each grid cell's catalogue mean
    feature_rank: int = 128  # principal directions kept; 0: all C raw dims
    # training: minus this times the item attention's mean normalised entropy is added to the
    # loss, against attention that collapses onto one profile item
    entropy_bonus: float = 0.0
    tied: bool = True
    item_term: bool = False
    item_bias: bool = True
    score_scale: float | None = 1.0  # None: 1 / dim, as in the tutorial
    # Order inside ACF's profile: causal self-attention blocks (SASRec's, with its ``heads``
    # and ``dropout``) contextualise the profile items before the item attention pools them.
    # configs/reproduce.toml's ACF has 2 (validation; README); the default stays 0 until the
    # whole plan has been run with them.
    context_blocks: int = 0
    user_embedding: bool = True  # False: ACF's user vector comes from the profile alone
    # training: each sample's user embedding is left out with this probability, so a user's
    # embedding cannot stand in for their recent items (and unknown users are trained for)
    user_dropout: float = 0.0
    # training, ACF with visual="score": each step, this share of the catalogue is scored
    # without its item embedding (its image, bias and profile side unchanged), so the image
    # path learns to rank an item alone, as it must for an item added after training
    item_dropout: float = 0.0
    # ACF: the items' genres (items.csv) as a second content channel beside the image, on
    # both the profile and the candidate side (ACFConfig.tags); POST /items then takes them
    metadata: bool = False
    # with metadata, the title's words and decade too (service.model.tags)
    titles: bool = False
    # SASRec (2 blocks and 1 head, as in the paper's ml-1m setting); ACF's context blocks
    dropout: float = 0.2
    blocks: int = 2
    heads: int = 1
    # fitted baselines
    ease_l2: float = 200.0
    transition_window: int = 5
    transition_decay: float = 0.8
    popularity_weight: float = 0.1
    patience: int = 5  # stop after this many epochs without a better validation nDCG@20
    seed: int = 0

    def __post_init__(self) -> None:
        positive = (
            "dim",
            "attention_dim",
            "epochs",
            "batch_size",
            "lr",
            "negatives",
            "full_softmax_items",
            "profile_size",
            "sample_run",
            "blocks",
            "heads",
            "transition_window",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) <= 0]
        shares = ("profile_dropout", "dropout", "user_dropout", "item_dropout")
        bad += [f"{n}={getattr(self, n)}" for n in shares if not 0 <= getattr(self, n) < 1]
        non_negative = (
            "weight_decay",
            "patience",
            "ease_l2",
            "entropy_bonus",
            "feature_rank",
            "context_blocks",
        )
        bad += [f"{n}={getattr(self, n)}" for n in non_negative if getattr(self, n) < 0]
        if self.model not in MODELS or self.loss not in LOSS_NAMES:
            bad.append(f"model={self.model!r}, loss={self.loss!r}")
        bad += [
            f"{name}={getattr(self, name)!r} (one of {', '.join(allowed)})"
            for name, allowed in CHOICES.items()
            if getattr(self, name) not in allowed
        ]
        if self.trains_every_position and (self.loss != "softmax" or self.entropy_bonus):
            bad.append(
                f"every_position=True with loss={self.loss!r}, entropy_bonus="
                f"{self.entropy_bonus} (it needs the softmax loss and no entropy bonus; "
                "say every_position=false)"
            )
        if self.titles and not self.metadata:
            bad.append("titles=True without metadata=True (titles are part of the metadata)")
        if bad:
            raise ValueError(f"invalid training setting(s): {'; '.join(bad)}")

    @property
    def trains_every_position(self) -> bool:
        return self.every_position and self.model in ("acf", "sasrec")

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
        self,
        *,
        n_users: int,
        n_items: int,
        n_components: int,
        feature_dim: int,
        tags: tuple[str, ...] = (),
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
            component_pool=self.component_pool,
            item_pool=self.item_pool,
            visual=self.visual,
            recency=self.profile_size if self.recency else 0,
            newest=self.newest,
            score_scale=self.score_scale,
            users=self.user_embedding,
            context_blocks=self.context_blocks,
            heads=self.heads,
            dropout=self.dropout,
            positions=self.profile_size,
            tags=tags if self.metadata else (),
        )


@dataclass
class TrainResult:
    model: nn.Module  # with the best epoch's weights
    best_epoch: int  # 1-based; 0 when the model has nothing to train
    history: list[dict[str, float]] = field(default_factory=list)
    projection: Projection | None = None  # what ACF's raw features went through

    @property
    def validation(self) -> dict[str, float]:
        """The kept model's validation row (a fitted model's only row)."""
        return self.history[max(self.best_epoch, 1) - 1] if self.history else {}


class InnerProduct(Protocol):
    def queries(self, users: Tensor, profiles: Tensor) -> Tensor: ...
    def item_vectors(self, items: Tensor | None = None) -> Tensor: ...


def build_model(
    config: TrainConfig,
    split: Split,
    features: np.ndarray | Tensor,
    tags: Sequence[frozenset[str]] = (),
) -> nn.Module:
    """A freshly initialised (or, for the fitted baselines, fitted) model, seeded by
    ``config.seed``; ``features`` (N, K, C) are what ACF and VBPR see, ``tags`` (N,) the
    items' metadata (:func:`service.model.tags.item_tags`) that ACF with ``metadata`` reads."""
    problem = metadata_problem(config, tags)
    if problem:
        raise ValueError(problem)
    words = vocabulary(tags, titles=config.titles) if config.metadata else ()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _build(config, split, features, tags, words)


def metadata_problem(config: TrainConfig, tags: Sequence[frozenset[str]]) -> str | None:
    """Why ``config`` cannot be trained on items with these ``tags``, or None: ACF with
    ``metadata`` needs a vocabulary to read."""
    if not (config.metadata and config.model == "acf"):
        return None
    if vocabulary(tags, titles=config.titles):
        return None
    return "metadata=true needs items with genres (a genres column in items.csv)" + (
        " or titles" if config.titles else ""
    )


def _build(
    config: TrainConfig,
    split: Split,
    features: np.ndarray | Tensor,
    tags: Sequence[frozenset[str]],
    words: tuple[str, ...],
) -> nn.Module:
    name = config.model
    if name in ("acf", "vbpr"):
        feats = torch.as_tensor(np.asarray(features, dtype=np.float32))  # a writable copy
        if name == "vbpr":
            return VBPR(split.n_users, feats, config.dim)
        n, k, c = feats.shape
        acf = config.acf_config(
            n_users=split.n_users, n_items=n, n_components=k, feature_dim=c, tags=words
        )
        return ACF(acf, feats, tag_rows(words, tags) if words else None)
    if name == "sasrec":
        return SASRec(
            SASRecConfig(
                split.n_items,
                config.profile_size,
                config.dim,
                config.blocks,
                config.heads,
                config.dropout,
            )
        )
    if name == "bpr_mf":
        return BPRMF(split.n_users, split.n_items, config.dim)
    if name == "ease":
        return EASE(
            split.train_users, split.train_items, split.n_users, split.n_items, l2=config.ease_l2
        )
    if name == "transitions":
        return Transitions(
            split.train_sequences(),
            split.n_items,
            window=config.transition_window,
            decay=config.transition_decay,
            popularity_weight=config.popularity_weight,
        )
    if name == "popularity":
        return Popularity(split.train_items, split.n_items)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    return -F.logsigmoid(pos - neg).mean()


def warp_loss(pos: Tensor, neg: Tensor, margin: float = 1.0) -> Tensor:
    """The VisRec tutorial's batch WARP-like loss: violations weighted by log(#violations)."""
    soft = torch.sigmoid(neg - pos + margin)
    violated = (soft > 0.5).float()
    weight = violated * (torch.log(violated.sum() + 1) + 1)
    return (weight * soft).mean()


PAIRWISE = {"bpr": bpr_loss, "warp": warp_loss}


@dataclass(frozen=True)
class Objective:
    """How one batch becomes a loss; built once per run from the config and the data."""

    loss: LossName
    sampled: bool  # softmax over sampled negatives (large catalogues)
    negatives: int
    log_q: Tensor  # (N+1,) log-probability of drawing each item as a sampled negative
    profile_dropout: float
    user_dropout: float
    item_dropout: float
    entropy_bonus: float

    @classmethod
    def create(cls, config: TrainConfig, samples: Samples, device: torch.device) -> Objective:
        counts = np.bincount(samples.positives, minlength=samples.n_items + 1).astype(np.float64)
        counts[1:] += 1.0  # every item can be drawn
        counts[PAD] = 0.0
        q = torch.as_tensor(counts / counts.sum(), dtype=torch.float32, device=device)
        return cls(
            loss=config.loss,
            sampled=config.loss == "softmax" and samples.n_items > config.full_softmax_items,
            negatives=config.negatives,
            log_q=q.log(),
            profile_dropout=config.profile_dropout,
            user_dropout=config.user_dropout,
            item_dropout=config.item_dropout,
            entropy_bonus=config.entropy_bonus,
        )

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        users, profiles, pos, neg = batch
        if self.profile_dropout:
            hidden = torch.rand(profiles.shape, generator=gen, device=gen.device)
            profiles = profiles.masked_fill(hidden < self.profile_dropout, PAD)
        bonus = torch.zeros(())
        if isinstance(model, ACF) and self.user_dropout:
            hidden = torch.rand(users.shape, generator=gen, device=gen.device)
            users = users.masked_fill(hidden < self.user_dropout, UNKNOWN_USER)
        if pos.ndim == 2:  # every position of each row (sampling.chunk_batches)
            q, pos = _every_position(model, users, profiles, pos)
        elif isinstance(model, ACF):
            attended = model.attend_profiles(users, profiles)
            q = model.query_vectors(attended.user)  # (B, D')
            if self.entropy_bonus:
                bonus = self.entropy_bonus * _normalised_entropy(attended.item_attention)
        else:
            q = cast(InnerProduct, model).queries(users, profiles)
        vectors = cast(InnerProduct, model).item_vectors
        if isinstance(model, ACF) and self.item_dropout:
            n = model.config.n_items + 1
            hidden = torch.rand(n, generator=gen, device=gen.device) < self.item_dropout
            vectors = partial(model.item_vectors, hidden=hidden.to(q.device))

        if self.loss in PAIRWISE:
            pairs = (q * vectors(pos)).sum(-1), (q * vectors(neg)).sum(-1)
            return PAIRWISE[self.loss](*pairs) - bonus
        if not self.sampled:
            return F.cross_entropy(q @ vectors().T, pos - 1) - bonus
        return self._sampled_softmax(q, pos, vectors, gen) - bonus

    def _sampled_softmax(
        self, q: Tensor, pos: Tensor, vectors: Callable[[Tensor], Tensor], gen: torch.Generator
    ) -> Tensor:
        drawn = torch.multinomial(self.log_q.exp(), self.negatives, True, generator=gen)  # (S,)
        positive = (q * vectors(pos)).sum(-1) - self.log_q[pos]  # (B,)
        negative = q @ vectors(drawn).T - self.log_q[drawn]  # (B, S)
        negative = negative.masked_fill(drawn[None, :] == pos[:, None], -math.inf)
        logits = torch.cat([positive[:, None], negative], dim=1)  # target at column 0
        return F.cross_entropy(logits, torch.zeros_like(pos))


def _every_position(
    model: nn.Module, users: Tensor, rows: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Queries (V, D') of every position of ``rows`` (B, L) that has a target, and those
    targets (V,)."""
    if isinstance(model, ACF):
        q = model.query_vectors(model.attend_every_position(users, rows).flatten(0, 1))
    else:
        q = cast(SASRec, model).queries_every_position(users, rows).flatten(0, 1)
    valid = (targets != PAD).flatten()
    return q[valid], targets.flatten()[valid]


class _Step(nn.Module):
    """One batch's loss as a module's forward, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: tuple[Tensor, ...], gen: torch.Generator) -> Tensor:
        return self.objective(self.model, batch, gen)


def _step_module(model: nn.Module, objective: Objective, device: torch.device) -> nn.Module:
    step = _Step(model, objective)
    if distributed.world_size() == 1:
        return step
    return nn.parallel.DistributedDataParallel(
        step,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the item features are constant, and large
        find_unused_parameters=True,  # e.g. ACF without images leaves its attention idle
    )


def _normalised_entropy(weights: Tensor) -> Tensor:
    """Mean entropy / log(n) of rows of ``weights`` over their n > 1 non-zero entries."""
    n = (weights > 0).sum(-1)
    rows = n > 1
    w = weights[rows]
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)  # xlogy's gradient at 0 is -inf
    return (entropy / n[rows].float().log()).mean() if bool(rows.any()) else weights.new_zeros(())


def train(
    model: nn.Module,
    samples: Samples,
    validation: Sequence[Task],
    config: TrainConfig,
    *,
    device: torch.device,
    rng: np.random.Generator,
    probe: Probe | None = None,
    progress: bool = True,
    state_path: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Adam on the configured loss; keeps the weights of the epoch with the best
    ``SELECTION_METRIC`` over the ``validation`` tasks (not the lowest loss) and stops after
    ``patience`` epochs without improvement.

    A model with nothing to train (the fitted baselines) is validated once. With a ``probe``,
    every epoch's row of the history also holds ACF's attention statistics
    (:func:`~service.offline.attention.attention_stats`), and a warning is logged when the kept
    epoch's attention is flat.

    With a ``state_path``, everything the next epoch depends on (weights, the best ones so far,
    Adam's moments, every random generator, the history) is written there after each epoch;
    ``resume`` continues from that file when it exists, so a killed run ends with the same
    weights as one that was never stopped. A run may resume with more ``epochs``, nothing
    else changed."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return TrainResult(model.eval(), 0, [_validate(model, validation, device)])
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    step = _step_module(model, Objective.create(config, samples, device), device)
    main = distributed.is_main()
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    # SASRec's dropout draws from torch's global generator: seeded per run, and restored after
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        subnormals_flushed(),  # ~1.9x faster on CPU once values underflow (runtime.py)
    ):
        torch.manual_seed(gen.initial_seed())
        run = _Run(copy.deepcopy(model.state_dict()))
        if resume and state_path is not None and state_path.is_file():
            run = _load_state(state_path, config, model, optimizer, rng, gen)
            log.info("resuming %s from %s after epoch %d", config.model, state_path, run.epoch)
        while run.epoch < config.epochs and not run.stopped(config.patience):
            epoch = run.epoch + 1
            started = time.perf_counter()
            loss = _run_epoch(
                step,
                optimizer,
                samples,
                config,
                device=device,
                rng=rng,
                gen=gen,
                desc=f"{config.model} epoch {epoch}/{config.epochs}",
                progress=progress and main,
            )
            row = {"epoch": float(epoch), "loss": loss, "seconds": time.perf_counter() - started}
            if main:  # the others wait for its figures, so every process stops alike
                row |= _validate(model, validation, device)
                if probe is not None and isinstance(model, ACF):
                    row |= attention_stats(model, probe)
            row = distributed.from_main(row)
            run.history.append(row)
            run.epoch = epoch
            if row[SELECTION_METRIC] >= max(h[SELECTION_METRIC] for h in run.history):
                run.best_state, run.best_epoch = copy.deepcopy(model.state_dict()), epoch
            if progress and main:
                tqdm.write(
                    f"{config.model} epoch {epoch}: loss {loss:.4f}  "
                    f"val nDCG@20 {_figures(row)}  "
                    f"{_attention_note(row)}({row['seconds']:.1f} s)"
                )
            if state_path is not None and main:
                _save_state(state_path, run, config, model, optimizer, rng, gen)
    model.load_state_dict(run.best_state)
    if run.history and main:
        _warn_if_flat(config.model, run.history[run.best_epoch - 1], run.best_epoch)
    return TrainResult(model.eval(), run.best_epoch, run.history)


@dataclass
class _Run:
    """Where a training run stands after ``epoch`` epochs."""

    best_state: dict[str, Tensor]
    best_epoch: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def stopped(self, patience: int) -> bool:
        return bool(patience) and self.epoch - self.best_epoch >= patience


def _run_settings(config: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the saved one: every setting but ``epochs``."""
    return {k: v for k, v in asdict(config).items() if k != "epochs"}


def _save_state(
    path: Path,
    run: _Run,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> None:
    state = {
        "settings": _run_settings(config),
        "epoch": run.epoch,
        "best_epoch": run.best_epoch,
        "history": run.history,
        "model": model.state_dict(),
        "best_model": run.best_state,
        "optimizer": optimizer.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),  # dropout (SASRec) draws from the global generator
        "cuda_rng": torch.cuda.get_rng_state(gen.device) if gen.device.type == "cuda" else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed while saving keeps the previous epoch's file


def _load_state(
    path: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> _Run:
    state = torch.load(path, map_location=gen.device, weights_only=True)
    saved, wanted = state["settings"], _run_settings(config)
    changed = [f"{k}={saved.get(k)!r} -> {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"{path} is a run with other settings ({'; '.join(changed)}); only epochs may "
            "change when resuming. Start over without resuming, or delete the file."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["numpy_rng"]
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), gen.device)
    return _Run(state["best_model"], state["best_epoch"], state["epoch"], state["history"])


def _attention_note(row: dict[str, float]) -> str:
    parts = [f"{level} {row[key]:.3f}" for level, key in LEVELS.items() if key in row]
    return f"attention entropy {', '.join(parts)}  " if parts else ""


def _warn_if_flat(model: str, row: dict[str, float], epoch: int) -> None:
    for level in flat_levels(row):
        log.warning(
            "%s: %s-level attention is flat at the kept epoch %d (normalised entropy %.3f; "
            "1.0 = uniform weights): the %s are averaged rather than attended",
            model,
            level,
            epoch,
            row[LEVELS[level]],
            "profile items" if level == "item" else "image components",
        )


def _run_epoch(
    step: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Samples,
    config: TrainConfig,
    *,
    device: torch.device,
    rng: np.random.Generator,
    gen: torch.Generator,
    desc: str,
    progress: bool,
) -> float:
    """One epoch of ``step`` (a :class:`_Step`, maybe data-parallel); the mean loss."""
    step.train()
    total, seen = 0.0, 0
    batches: Iterator[Batch]
    if config.trains_every_position:
        users, rows = sequence_chunks(samples.sequences(), config.profile_size)
        n_batches = -(-len(users) // rows_per_batch(config.batch_size, config.profile_size))
        batches = chunk_batches(users, rows, config.batch_size, rng)
    else:
        n_batches = -(-len(samples.users) // config.batch_size)
        batches = epoch_batches(
            samples,
            config.batch_size,
            rng,
            run=config.sample_run,
            negatives=config.loss in PAIRWISE,
        )
    bar = tqdm(
        batches,
        total=n_batches,
        desc=desc,
        unit="batch",
        disable=not progress,
        leave=False,
        mininterval=bar_interval(),
    )
    for batch in bar:
        part, weight = distributed.share(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = step(_to_device(part, device), gen)
        (loss * weight).backward()
        optimizer.step()
        total += loss.item() * len(part.users)
        seen += len(part.users)
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    summed, count = distributed.total([total, float(seen)])  # over every process's share
    return summed / count


def _to_device(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    arrays = (batch.users, batch.profiles, batch.positives, batch.negatives)
    return tuple(torch.as_tensor(a, device=device) for a in arrays)  # type: ignore[return-value]


def _validate(model: nn.Module, tasks: Sequence[Task], device: torch.device) -> dict[str, float]:
    """nDCG@20 and R@20 on each task (keys prefixed by the protocol, bare for ``standard``),
    and their mean nDCG@20, the ``SELECTION_METRIC``."""
    model.eval()
    row: dict[str, float] = {}
    for task in tasks:
        table = evaluate(model, task, device=device)  # type: ignore[arg-type]
        prefix = "" if task.protocol == "standard" else f"{task.protocol} "
        row |= {f"{prefix}{k}": float(table[k].mean()) for k in ("nDCG@20", "R@20")}
    row[SELECTION_METRIC] = float(np.mean([row[_key(t.protocol)] for t in tasks]))
    return row


def _key(protocol: str) -> str:
    return "nDCG@20" if protocol == "standard" else f"{protocol} nDCG@20"


def _figures(row: dict[str, float]) -> str:
    """Validation nDCG@20 per protocol, for the progress line."""
    parts = [f"{p} {row[_key(p)]:.4f}" for p in ("standard", "seed") if _key(p) in row]
    return ", ".join(parts)
