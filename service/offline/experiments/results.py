"""What a run of the plan measured: per row, its runs and per-user tables, and the comparison
the results page is written from (:mod:`service.offline.experiments.reproduce` fills them,
:mod:`service.offline.experiments.report` writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.offline.evaluation.metrics import Interval
from service.offline.training.config import SERVING_METRIC

Table = dict[str, np.ndarray]  # metric -> (U,) per-user values


@dataclass(frozen=True)
class ModelRun:
    name: str
    config: dict[str, Any]
    seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seed: int = 0

    @property
    def validation(self) -> dict[str, float]:
        """The kept epoch's validation row."""
        return self.history[max(self.best_epoch, 1) - 1] if self.history else {}


@dataclass
class RowResult:
    """One row's runs: a table per seed and protocol, and its heatmap statistics."""

    name: str
    runs: list[ModelRun] = field(default_factory=list)
    tables: dict[str, list[Table]] = field(default_factory=dict)  # protocol -> per seed
    heatmaps: list[dict[str, float]] = field(default_factory=list)  # per seed (ACF)
    new_items: list[np.ndarray] = field(default_factory=list)  # per seed: (U,) precision@20

    def pooled(self, protocol: str) -> Table:
        """Per-user metrics averaged over seeds."""
        per_seed = self.tables[protocol]
        return {k: np.mean([t[k] for t in per_seed], axis=0) for k in per_seed[0]}

    def seed_means(self, protocol: str) -> dict[str, list[float]]:
        per_seed = self.tables[protocol]
        return {k: [float(t[k].mean()) for t in per_seed] for k in per_seed[0]}

    @property
    def validation(self) -> float:
        """``standard`` validation nDCG@20, mean over seeds (what chooses the served row)."""
        return float(np.mean([run.validation[SERVING_METRIC] for run in self.runs]))


@dataclass(frozen=True)
class Comparison:
    """Everything the page says about one dataset."""

    dataset: str
    rows: list[RowResult]
    summary: dict[str, dict[str, dict[str, Interval]]]  # protocol -> row -> metric
    spread: dict[str, dict[str, dict[str, float]]]  # protocol -> row -> metric: sd over seeds
    diffs: dict[str, dict[str, dict[str, Interval]]]  # protocol -> row -> metric: ref - row
    # Rows that rank new items from their images: precision@20 among them, and ref - row
    new_items: dict[str, Interval] = field(default_factory=dict)
    new_items_diffs: dict[str, Interval] = field(default_factory=dict)
    tail: list[TailBucket] = field(default_factory=list)  # `standard`, by target popularity
    contest: Contest | None = None  # the best ACF variant against SASRec


@dataclass(frozen=True)
class Contest:
    """The ACF row best on `standard` validation against the SASRec row: what the page's
    goal asks (ACF ahead on both headline metrics under both protocols)."""

    acf: str
    sasrec: str
    diffs: dict[str, dict[str, Interval]]  # protocol -> metric: acf - sasrec, paired over users


@dataclass(frozen=True)
class TailBucket:
    """`standard`'s test users whose target had ``low..high`` training interactions."""

    label: str
    users: int
    summary: dict[str, dict[str, Interval]]  # row -> metric
    diffs: dict[str, dict[str, Interval]]  # row -> metric: ref - row, paired over these users
