"""Serving tables: what a request reads about an item, computed once per model, kept on disk.

For every item: its reduced components ``x`` (K, D) (float16 by default), the vector the index
searches (D', float32), and for models that score new items from their images its unit image
vector (D, float16), which places a new item among its visual neighbours. Raw C-dimensional
features are read once, in chunks, to compute them, and never held whole.

On disk (a folder, see :func:`write_tables`) the components are memory-mapped: at a million
items they take 1M x 49 x 64 x 2 bytes = 6.3 GB, of which a request reads the rows of its few
profile items, and processes serving the same files (workers, replicas on one host) share the
pages. Attention keys are not stored: they are one small product over a request's rows.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from service.model.acf import ACF
from service.model.checkpoint import read_checkpoint
from service.model.feature_store import load_features
from service.model.projection import Projection, project

log = logging.getLogger("visrec.tables")
REDUCED, VECTORS, IMAGES, DONE = "reduced.npy", "vectors.npy", "images.npy", "tables.json"
CHUNK = 8192  # items per step: 8192 x 49 x 1280 float32 raw features are 2 GB at most
TABLES = "serving"  # a checkpoint's tables: <its features>/serving/<checkpoint digest[:12]>/


class Rows:
    """Rows of one or more arrays, stacked without copying them (the first may be a memory
    map of millions of rows, the others the few items added while serving)."""

    def __init__(self, *parts: np.ndarray) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) as one in-memory array."""
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][index])
        part = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), *self.parts[0].shape[1:]), dtype=self.dtype)
        for p in np.unique(part):
            here = part == p
            out[here] = self.parts[p][index[here] - self.starts[p]]
        return out

    def append(self, rows: np.ndarray) -> Rows:
        return Rows(*self.parts, rows.astype(self.dtype))


@dataclass(frozen=True)
class ServingTables:
    reduced: Rows  # (N+1, K, D); row 0, the padding item, is zeros
    vectors: np.ndarray  # (N, D') float32: query @ vectors.T is the score
    images: np.ndarray | None  # (N, D) float16 unit image vectors; None: not a visual="score" model


def compute_tables(
    model: ACF,
    features: np.ndarray | torch.Tensor,
    projection: Projection | None = None,
    *,
    dtype: np.dtype | type = np.float16,
) -> ServingTables:
    """The tables of raw ``features`` (N, K, C) under ``model``, in memory."""
    reduced, vectors, images = table_rows(model, features, projection, dtype=dtype)
    pad = np.zeros((1, *reduced.shape[1:]), dtype=reduced.dtype)
    return ServingTables(
        Rows(np.concatenate([pad, reduced])),
        vectors,
        images if model.config.visual == "score" else None,
    )


def table_rows(
    model: ACF,
    features: np.ndarray | torch.Tensor,
    projection: Projection | None = None,
    *,
    first: int = 1,
    dtype: np.dtype | type = np.float16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reduced components, item vectors, unit image vectors) of items ``first..`` with these
    raw features."""
    chunks = list(_chunks(model, features, projection, np.dtype(dtype), first))
    return tuple(np.concatenate(parts) for parts in zip(*chunks, strict=True))  # type: ignore[return-value]


def write_tables(
    folder: Path,
    model: ACF,
    features: np.ndarray,
    projection: Projection | None = None,
    *,
    progress: bool = False,
) -> None:
    """Compute the tables chunk by chunk into ``folder``, whole or not at all: they are written
    beside it and renamed into place, so a concurrent reader never sees half of them."""
    # one writer's own (two engines of one process may build the same tables at once)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    partial.mkdir(parents=True)
    n, k, d = len(features), model.config.n_components, model.config.dim
    visual = model.config.visual == "score"
    chunks = _chunks(model, features, projection, np.dtype(np.float16), 1)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, total=-(-n // CHUNK), desc="serving tables", unit="chunk")
    with (
        _npy(partial / REDUCED, np.float16, (n + 1, k, d)) as reduced,
        _npy(partial / VECTORS, np.float32, (n, _vector_dim(model))) as vectors,
        _npy(partial / IMAGES, np.float16, (n if visual else 0, d)) as images,
    ):
        reduced.write(np.zeros((1, k, d), np.float16).tobytes())
        for x, v, image in chunks:
            reduced.write(x.tobytes())
            vectors.write(v.tobytes())
            if visual:
                images.write(image.tobytes())
    (partial / DONE).write_text(json.dumps({"items": n, "dim": d, "components": k}))
    try:
        partial.rename(folder)
    except OSError:  # another process put the same tables there first
        shutil.rmtree(partial, ignore_errors=True)


def read_tables(folder: Path) -> ServingTables | None:
    """The tables :func:`write_tables` left in ``folder``, memory-mapped; None when there are
    none (or only an unfinished write)."""
    if not (folder / DONE).is_file():
        return None
    images = np.load(folder / IMAGES, mmap_mode="r")
    return ServingTables(
        Rows(np.load(folder / REDUCED, mmap_mode="r")),
        np.load(folder / VECTORS),  # the index copies them anyway: in memory, contiguous
        images if len(images) else None,
    )


def tables_folder(features: Path, checkpoint_digest: str) -> Path:
    return features / TABLES / checkpoint_digest[:12]


def ensure_tables(
    folder: Path, model: ACF, features: np.ndarray, projection: Projection | None
) -> ServingTables:
    """The tables in ``folder``, written there first when they are not (computed in memory
    instead, with a warning, when the folder cannot be written)."""
    found = read_tables(folder)
    if found is not None:
        return found
    try:
        write_tables(folder, model, features, projection, progress=len(features) > CHUNK)
    except OSError as err:
        log.warning("cannot write serving tables to %s (%s): computing them in memory", folder, err)
        return compute_tables(model, features, projection)
    tables = read_tables(folder)
    assert tables is not None
    return tables


def write_serving_tables(checkpoint: Path, features: Path) -> Path:
    """Write an ACF checkpoint's tables beside its features unless they are there (``visrec
    publish`` does, so that replicas only read them); their folder."""
    raw, meta = load_features(features)
    ckpt, digest = read_checkpoint(checkpoint)
    ckpt.check_features(meta.inputs_hash, meta.item_ids)
    folder = tables_folder(features, digest)
    model = ckpt.serving_model()
    if isinstance(model, ACF) and read_tables(folder) is None:  # SASRec has none
        write_tables(folder, model, raw, ckpt.feature_map, progress=True)
    return folder


def _vector_dim(model: ACF) -> int:
    return model.config.dim + (1 if model.config.item_bias else 0)


@torch.inference_mode()
def _chunks(
    model: ACF,
    features: np.ndarray | torch.Tensor,
    projection: Projection | None,
    dtype: np.dtype,
    first: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(reduced components, item vectors, unit image vectors) of ``CHUNK`` items at a time,
    numbered from ``first``."""
    device = model.reduce.weight.device
    for start in range(0, len(features), CHUNK):
        raw = features[start : start + CHUNK]
        x = project(raw, projection).to(device)  # (n, K, R) float32
        reduced = model.reduce(x)  # (n, K, D)
        image = (model.image_weights(reduced).unsqueeze(1) @ reduced).squeeze(1)  # x̃
        items = torch.arange(first + start, first + start + len(x), device=device)
        visual = model.config.visual == "score"
        vectors = model.vectors_with_image(items, image if visual else None)
        yield (
            reduced.cpu().numpy().astype(dtype),
            vectors.float().cpu().numpy(),
            F.normalize(image, dim=1).cpu().numpy().astype(np.float16),
        )


class _npy:
    """A ``.npy`` file written row block by row block, never mapped (so never resident)."""

    def __init__(self, path: Path, dtype: type, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape

    def __enter__(self) -> BinaryIO:
        self.file = self.path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}  # fmt: skip
        np.lib.format.write_array_header_1_0(self.file, header)
        return self.file

    def __exit__(self, *exc: object) -> None:
        self.file.close()
