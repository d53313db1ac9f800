"""The on-disk feature store that the offline extractor writes and both paths read.

A folder holds

- ``features.npy``: float16 ``(N, 49, C)``, row ``i`` is ``item_ids[i]``, the 49 cells are the
  7x7 grid in row-major order (``cell = row * 7 + col``). Written with ``open_memmap`` so readers
  can memory-map it.
- ``features.json``: ``FeatureMeta``, written when an extraction starts.
- ``progress.json``: how many leading rows are finished, rewritten (atomically) after each
  batch's rows are flushed. An extraction is complete when it counts all ``N`` rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FEATURES_FILE = "features.npy"
META_FILE = "features.json"
PROGRESS_FILE = "progress.json"
# A features folder may hold the backbone weights its grids were read with (a backbone fitted
# to the catalogue, service/offline/data/adapt.py): the server reads new images with them.
BACKBONE_FILE = "backbone.pth"


class FeatureError(ValueError):
    """A feature folder that is missing, incomplete or inconsistent with its metadata."""


@dataclass(frozen=True)
class FeatureMeta:
    """What ``features.npy`` holds: ``(len(item_ids), grid * grid, feature_dim)`` of ``dtype``."""

    backbone: str
    input_size: int
    feature_dim: int
    grid: int
    item_ids: list[int]
    inputs_hash: str
    dtype: str = "float16"
    # backbones.weights_identity of the weights the grids were read with: an added item's image
    # must be read with the same ones. "" in folders written before it was recorded: unknown.
    weights_id: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.item_ids), self.grid * self.grid, self.feature_dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FeatureMeta:
        """Parse ``to_json``'s output; raises FeatureError on missing or unknown fields."""
        try:
            raw = json.loads(text)
            raw["item_ids"] = [int(i) for i in raw["item_ids"]]
            return cls(**raw)
        except (TypeError, ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
            raise FeatureError(f"not valid feature metadata: {err}") from err


@dataclass(frozen=True)
class Progress:
    inputs_hash: str
    rows_done: int


def read_progress(out_dir: Path) -> Progress | None:
    try:
        raw = json.loads((out_dir / PROGRESS_FILE).read_text())
        return Progress(inputs_hash=str(raw["inputs_hash"]), rows_done=int(raw["rows_done"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_features(out_dir: Path) -> tuple[np.ndarray, FeatureMeta]:
    """Read-only memory-mapped features ``(N, grid * grid, C)`` and their metadata.

    Raises FeatureError when a file is missing, the extraction is incomplete or was made for
    other inputs than the metadata describes, or the array disagrees with the metadata.
    """
    out_dir = Path(out_dir)
    for file in (FEATURES_FILE, META_FILE, PROGRESS_FILE):
        if not (out_dir / file).is_file():
            raise FeatureError(f"{out_dir / file} is missing; run extract_features first")
    meta = FeatureMeta.from_json((out_dir / META_FILE).read_text())
    progress = read_progress(out_dir)
    if progress is None or progress.inputs_hash != meta.inputs_hash:
        raise FeatureError(f"{out_dir}: progress does not belong to these features; re-extract")
    if progress.rows_done < len(meta.item_ids):
        raise FeatureError(
            f"{out_dir}: extraction incomplete ({progress.rows_done} of {len(meta.item_ids)} "
            "rows); run extract_features again to finish it"
        )
    try:
        array = np.load(out_dir / FEATURES_FILE, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise FeatureError(f"{out_dir / FEATURES_FILE} is not a readable .npy file: {err}") from err
    if array.shape != meta.shape or array.dtype != np.dtype(meta.dtype):
        raise FeatureError(
            f"{out_dir}: array is {array.dtype} {array.shape}, "
            f"metadata says {meta.dtype} {meta.shape}"
        )
    return array, meta
