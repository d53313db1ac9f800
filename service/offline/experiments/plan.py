"""What ``make reproduce`` and ``make sweep`` run, read from TOML.

A plan names *rows*: a model with its training settings, each trained with every seed. Settings
are layered: :class:`TrainConfig`'s defaults, then the plan's ``[train]`` table (shared by every
row), then the ``[train]`` table of a row's ``base`` file when it has one (``configs/
tutorial.toml`` for the tutorial's ACF), then the row's own ``[models.<row>]`` table. A row whose
name is not a model's says which model it is with ``model = ...``. An ablation says
``like = "<row>"``: it starts from that row's table (model included) and changes one thing, so
settings the sweep finds for the row reach its ablations too. ``main = false`` keeps a row out
of the main table: it is trained only where another part of the plan names it (``[cold]``).

``first_start`` names the rows ``visrec-serve`` may train when it starts on data that no
``visrec reproduce`` has chosen a row for: the first of them the data can train is served.

A plan says where its settings were chosen (``[tuned]``: the dataset, a fingerprint of its
interactions, and how), so a run on other data can tell that they were not chosen there. A
plan written by ``visrec tune`` names another plan as its ``base`` and holds only the row
settings it found on its dataset's validation, layered on the base's rows.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast, get_args

from service.model.backbones import DEFAULT_BACKBONE
from service.offline.data.adapt import BACKBONE as ADAPTABLE
from service.offline.data.adapt import Target
from service.offline.data.synthetic import WorldSpec
from service.offline.training.config import MODELS, TrainConfig
from service.offline.training.train import metadata_problem

DEFAULT_PLAN = Path("configs/reproduce.toml")  # relative to the repository, as make runs it


@dataclass(frozen=True)
class Row:
    name: str
    config: TrainConfig  # its seed is replaced by each of the plan's seeds
    # False (``main = false`` in its table): not a row of the main table, only trained where
    # another part of the plan names it (e.g. ``[cold]``)
    main: bool = True


@dataclass(frozen=True)
class SyntheticPlan:
    """The ablation on a generated world whose right answer is known."""

    spec: WorldSpec
    rows: tuple[str, ...]  # names of the plan's rows, run again on the world
    train: dict[str, Any] = field(default_factory=dict)  # overrides for every row there


@dataclass(frozen=True)
class ColdPlan:
    """The cold-item protocol (:mod:`service.offline.experiments.cold`): which rows are trained
    on the warm items and ranked with the held-out ones added as ``POST /items`` adds them."""

    rows: tuple[str, ...]  # names of the plan's rows (ACF rows that score items by image)
    share: float = 0.2  # of the items with interactions, held out (half validation, half test)
    seed: int = 0  # draws the held-out items
    seeds: tuple[int, ...] = ()  # the rows' training seeds; empty: the plan's


@dataclass(frozen=True)
class Tuned:
    """Where a plan's row settings were chosen."""

    dataset: str  # the dataset folder's name
    fingerprint: str  # data.fingerprint of its interactions
    by: str  # how, in words (the command, its budget, where its page is)


@dataclass(frozen=True)
class Plan:
    rows: tuple[Row, ...]
    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    # the backbone's last stage fitted to the items' genres or taste (service/offline/data/
    # adapt.py) before the features are read; the cold protocol fits its own on the warm items
    adapt: Target | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    reference: str = "acf"  # the row every other is compared with
    n_resamples: int = 1000
    bootstrap_seed: int = 0
    synthetic: SyntheticPlan | None = None
    cold: ColdPlan | None = None
    tuned: Tuned | None = None
    first_start: tuple[str, ...] = ()  # rows a first start may train; empty: the reference

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise ValueError(f"no row {name!r} in the plan (rows: {', '.join(self.row_names)})")

    @property
    def row_names(self) -> list[str]:
        return [r.name for r in self.rows]

    @property
    def main_rows(self) -> tuple[Row, ...]:
        """The rows of the main table (all but those marked ``main = false``)."""
        return tuple(r for r in self.rows if r.main)

    def first_start_row(self, tags: Sequence[frozenset[str]]) -> Row:
        """The row a first start trains on items with these ``tags`` (``Dataset.tags``): the
        first of ``first_start`` the data can train, else the reference."""
        for name in self.first_start:
            if metadata_problem(self.row(name).config, tags) is None:
                return self.row(name)
        return self.row(self.reference)

    def tuned_on(self, fingerprint: str) -> bool:
        """Were the settings chosen on the data with this fingerprint (``data.fingerprint``)?"""
        return self.tuned is not None and self.tuned.fingerprint == fingerprint

    def settings_note(self, fingerprint: str) -> str:
        """Where the settings were chosen, in words, for a run on the data with this
        fingerprint (the results page)."""
        if self.tuned is None:
            return (
                "The plan does not say where its settings were chosen; `visrec tune` chooses "
                "them on this dataset's validation."
            )
        if self.tuned_on(fingerprint):
            return (
                f"Settings of every row were chosen on this dataset's validation by "
                f"{self.tuned.by}."
            )
        return (
            f"**Settings were chosen on `{self.tuned.dataset}`'s validation, not on this "
            f"dataset's** ({self.tuned.by}); `visrec tune` chooses them here."
        )


def load_plan(path: Path | None) -> Plan:
    """A plan file; with none, every model once with its defaults."""
    raw: dict[str, Any] = tomllib.loads(path.read_text()) if path else {}
    here = path.parent if path else Path()
    if "base" in raw:  # a tuned plan: the base plan's, with its own row settings on top
        base_path = here / raw["base"]
        raw, here = _layered(tomllib.loads(base_path.read_text()), raw), base_path.parent
    shared = raw.get("train", {})
    tables = raw.get("models") or {m: {} for m in MODELS}
    rows = tuple(_row(name, _table(name, tables), shared, here) for name in tables)
    feats = raw.get("features", {})
    plan = Plan(
        rows=rows,
        backbone=feats.get("backbone", DEFAULT_BACKBONE),
        weights=Path(feats["weights"]) if feats.get("weights") else None,
        adapt=_adapt(feats.get("adapt"), feats.get("backbone", DEFAULT_BACKBONE)),
        seeds=tuple(int(s) for s in raw.get("seeds", (0, 1, 2))),
        reference=raw.get("reference", rows[0].name),
        n_resamples=int(raw.get("n_resamples", 1000)),
        bootstrap_seed=int(raw.get("bootstrap_seed", 0)),
        synthetic=_synthetic(raw["synthetic"]) if "synthetic" in raw else None,
        cold=_cold(raw["cold"]) if "cold" in raw else None,
        tuned=Tuned(**raw["tuned"]) if "tuned" in raw else None,
        first_start=tuple(raw.get("first_start", ())),
    )
    plan.row(plan.reference)  # must exist
    if not plan.seeds:
        raise ValueError(f"{path}: seeds is empty")
    for name in (
        *(plan.synthetic.rows if plan.synthetic else ()),
        *(plan.cold.rows if plan.cold else ()),
        *plan.first_start,
    ):
        plan.row(name)
    return plan


def _layered(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """The base plan with the tuned plan's row settings (and ``[tuned]``) on top."""
    models = {name: dict(table) for name, table in base.get("models", {}).items()}
    for name, table in tuned.get("models", {}).items():
        if name not in models:
            raise ValueError(f"the tuned plan sets row {name!r}, which its base plan lacks")
        models[name].update(table)
    layered = {**base, "models": models}
    if "tuned" in tuned:
        layered["tuned"] = tuned["tuned"]
    return layered


def _table(name: str, tables: dict[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row's own settings, on top of those of the row it is ``like``."""
    table = dict(tables[name])
    like = table.pop("like", None)
    if like is None:
        return table
    if like not in tables or like in (*seen, name):
        raise ValueError(f"row {name!r}: like = {like!r} names no row, or a row like itself")
    return {"model": like, **_table(like, tables, (*seen, name)), **table}


def _row(name: str, table: dict[str, Any], shared: dict[str, Any], here: Path) -> Row:
    model = table.pop("model", name)
    if model not in MODELS:
        raise ValueError(
            f"row {name!r}: unknown model {model!r} (models: {', '.join(MODELS)}); a row named "
            "otherwise says which model it is with model = ..."
        )
    base_file = table.pop("base", None)
    main = table.pop("main", True)
    if not isinstance(main, bool):
        raise ValueError(f"row {name!r}: main = {main!r} (true or false)")
    base = tomllib.loads((here / base_file).read_text()).get("train", {}) if base_file else {}
    return Row(name, TrainConfig.from_dict({**shared, **base, **table, "model": model}), main)


def _synthetic(raw: dict[str, Any]) -> SyntheticPlan:
    raw = dict(raw)
    rows = tuple(raw.pop("rows"))
    train = raw.pop("train", {})
    known = {f.name for f in fields(WorldSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"[synthetic]: unknown world setting(s) {', '.join(unknown)}")
    return SyntheticPlan(WorldSpec(**raw), rows, train)


def _cold(raw: dict[str, Any]) -> ColdPlan:
    unknown = sorted(set(raw) - {f.name for f in fields(ColdPlan)})
    if unknown:
        raise ValueError(f"[cold]: unknown setting(s) {', '.join(unknown)}")
    cold = ColdPlan(
        tuple(raw["rows"]),
        float(raw.get("share", 0.2)),
        int(raw.get("seed", 0)),
        tuple(int(s) for s in raw.get("seeds", ())),
    )
    if not cold.rows or not 0 < cold.share < 1:
        raise ValueError(f"[cold]: rows must name rows and share be in (0, 1), got {raw}")
    return cold


def _adapt(target: object, backbone: str) -> Target | None:
    if target is None:
        return None
    if target not in get_args(Target):
        raise ValueError(f"[features] adapt must be one of {get_args(Target)}, not {target!r}")
    if backbone != ADAPTABLE:
        raise ValueError(f"[features] adapt fits {ADAPTABLE}'s last stage, not {backbone}'s")
    return cast(Target, target)


def seeded(config: TrainConfig, seed: int, **changes: Any) -> TrainConfig:
    return replace(config, seed=seed, **changes)
