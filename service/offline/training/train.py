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
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from service.files import write_atomically
from service.model.acf import ACF
from service.model.projection import Projection
from service.model.sasrec import SASRec, SASRecConfig
from service.model.tags import tag_rows, vocabulary
from service.offline.data.dataset import Split
from service.offline.data.sampling import (
    Batch,
    Samples,
    chunk_batches,
    epoch_batches,
    rows_per_batch,
    sequence_chunks,
)
from service.offline.evaluation.attention import LEVELS, Probe, attention_stats, flat_levels
from service.offline.evaluation.evaluate import Task, evaluate
from service.offline.training import distributed
from service.offline.training.baselines import BPRMF, EASE, VBPR, Popularity, Transitions
from service.offline.training.config import (
    MODELS,
    SELECTION_METRIC,
    TrainConfig,
    reads_user_key,
)
from service.offline.training.objective import PAIRWISE, Objective
from service.runtime import bar_interval, subnormals_flushed

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: nn.Module  # with the best epoch's weights
    best_epoch: int  # 1-based; 0 when the model has nothing to train
    history: list[dict[str, float]] = field(default_factory=list)
    projection: Projection | None = None  # what ACF's raw features went through
    seconds: float = 0.0  # the run's wall time, where it was timed (runner.Runner)

    @property
    def validation(self) -> dict[str, float]:
        """The kept model's validation row (a fitted model's only row)."""
        return self.history[max(self.best_epoch, 1) - 1] if self.history else {}


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
    (:func:`~service.offline.evaluation.attention.attention_stats`), and a warning is logged when
    the kept epoch's attention is flat.

    With a ``state_path``, everything the next epoch depends on is written there after each
    epoch, and ``resume`` continues from it (:func:`_start`)."""
    params = [p for p in model.to(device).parameters() if p.requires_grad]
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
        run = _start(model, optimizer, config, rng, gen, state_path if resume else None)
        while run.epoch < config.epochs and not run.stopped(config.patience):
            row = _epoch(
                step,
                optimizer,
                model,
                samples,
                validation,
                config,
                epoch=run.epoch + 1,
                device=device,
                rng=rng,
                gen=gen,
                probe=probe,
                progress=progress,
            )
            run.record(row, model)
            if state_path is not None and main:
                _save_state(state_path, run, config, model, optimizer, rng, gen)
    model.load_state_dict(run.best_state)
    if run.history and main:
        _warn_if_flat(config.model, run.history[run.best_epoch - 1], run.best_epoch)
    return TrainResult(model.eval(), run.best_epoch, run.history)


def _start(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    state_path: Path | None,
) -> _Run:
    """A new run, or the one saved at ``state_path`` when that file exists: everything the
    next epoch depends on (weights, the best ones so far, Adam's moments, every random
    generator, the history), so a killed run ends with the same weights as one that was never
    stopped. A run may resume with more ``epochs``, nothing else changed."""
    if state_path is None or not state_path.is_file():
        return _Run(copy.deepcopy(model.state_dict()))
    run = _load_state(state_path, config, model, optimizer, rng, gen)
    log.info("resuming %s from %s after epoch %d", config.model, state_path, run.epoch)
    return run


def _epoch(
    step: nn.Module,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    samples: Samples,
    validation: Sequence[Task],
    config: TrainConfig,
    *,
    epoch: int,
    device: torch.device,
    rng: np.random.Generator,
    gen: torch.Generator,
    probe: Probe | None,
    progress: bool,
) -> dict[str, float]:
    """Epoch ``epoch`` and its row of the history: loss, seconds, the validation figures (and,
    with a ``probe``, ACF's attention statistics), computed by the main process and shared
    with the others, so that every process stops alike."""
    main = distributed.is_main()
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
    if main:
        row |= _validate(model, validation, device)
        if probe is not None and isinstance(model, ACF):
            row |= attention_stats(model, probe)
    row = distributed.from_main(row)
    if progress and main:
        tqdm.write(
            f"{config.model} epoch {epoch}: loss {loss:.4f}  val nDCG@20 {_figures(row)}  "
            f"{_attention_note(row)}({row['seconds']:.1f} s)"
        )
    return row


@dataclass
class _Run:
    """Where a training run stands after ``epoch`` epochs."""

    best_state: dict[str, Tensor]
    best_epoch: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def stopped(self, patience: int) -> bool:
        return bool(patience) and self.epoch - self.best_epoch >= patience

    def record(self, row: dict[str, float], model: nn.Module) -> None:
        """The next epoch's row of the history; its weights are kept if it is the best yet."""
        self.history.append(row)
        self.epoch += 1
        if row[SELECTION_METRIC] >= max(h[SELECTION_METRIC] for h in self.history):
            self.best_state, self.best_epoch = copy.deepcopy(model.state_dict()), self.epoch


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
    write_atomically(path, lambda tmp: torch.save(state, tmp))  # a kill keeps the last epoch's


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
        times = samples.time_sequences()
        when = None if times is None else sequence_chunks(times, config.profile_size)[1]
        n_batches = -(-len(users) // rows_per_batch(config.batch_size, config.profile_size))
        batches = chunk_batches(users, rows, config.batch_size, rng, when)
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


def _to_device(batch: Batch, device: torch.device) -> tuple[Tensor, ...]:
    arrays = (batch.users, batch.profiles, batch.positives, batch.negatives, batch.times)
    return tuple(torch.as_tensor(a, device=device) for a in arrays)


def _validate(model: nn.Module, tasks: Sequence[Task], device: torch.device) -> dict[str, float]:
    """nDCG@20 and R@20 on each task (keys prefixed by the protocol, bare for ``standard``),
    and their mean nDCG@20, the ``SELECTION_METRIC``.

    An ACF with user embeddings is scored with and without them on each task: the better
    reading by nDCG@20 gives the task's figures, and ``reads user`` (1 or 0) records which, so
    validation chooses per protocol whether the embedding is read (:func:`as_scored`); the
    other reading's nDCG@20 is kept as ``nDCG@20 with user`` / ``without user``."""
    model.eval()
    alone = model.without_users() if _has_users(model) else None  # one copy for every task
    row: dict[str, float] = {}
    for task in tasks:
        prefix = "" if task.protocol == "standard" else f"{task.protocol} "
        reads = reads_user_key(task.protocol)
        tables = {"with user": evaluate(model, task, device=device)}  # type: ignore[arg-type]
        if alone is not None:
            tables["without user"] = evaluate(alone, task, device=device)
            ndcg = {how: float(t["nDCG@20"].mean()) for how, t in tables.items()}
            row |= {f"{prefix}nDCG@20 {how}": v for how, v in ndcg.items()}
            row[reads] = float(ndcg["with user"] >= ndcg["without user"])
        table = tables["with user" if row.get(reads, 1.0) else "without user"]
        row |= {f"{prefix}{k}": float(table[k].mean()) for k in ("nDCG@20", "R@20")}
    row[SELECTION_METRIC] = float(np.mean([row[_key(t.protocol)] for t in tasks]))
    return row


def as_scored(model: nn.Module, validation: Mapping[str, float], protocol: str) -> nn.Module:
    """``model`` as ``protocol`` scores it: an ACF without its user embeddings where that
    protocol's validation ranked better without them (see :func:`_validate`)."""
    if _has_users(model) and not validation.get(reads_user_key(protocol), 1.0):
        return model.without_users()
    return model


def _has_users(model: nn.Module) -> TypeGuard[ACF]:
    return isinstance(model, ACF) and model.user_embedding is not None


def _key(protocol: str) -> str:
    return "nDCG@20" if protocol == "standard" else f"{protocol} nDCG@20"


def _figures(row: dict[str, float]) -> str:
    """Validation nDCG@20 per protocol, for the progress line (marked where it is read
    without ACF's user vector)."""
    parts = [
        f"{p} {row[_key(p)]:.4f}" + (" (no user)" if not row.get(reads_user_key(p), 1.0) else "")
        for p in ("standard", "seed")
        if _key(p) in row
    ]
    return ", ".join(parts)
