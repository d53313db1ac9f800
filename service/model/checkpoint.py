"""Self-contained checkpoints of the served models (ACF, or SASRec where it wins): everything
but the item features themselves.

A checkpoint holds which model it is, its config and weights, the user and item id maps, the
metadata of the features it was trained on (so that other features are refused), the training
config, the validation metrics and history, and the code version. It is a plain ``torch.save``
dict that loads with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.files import write_atomically
from service.model.acf import ACF, ACFConfig
from service.model.projection import Projection, project
from service.model.sasrec import SASRec, SASRecConfig

FORMAT = "visrec/3"
# visrec-acf/2 was ACF only; /1 had no feature projection either. Both load as ACF checkpoints.
READABLE = (FORMAT, "visrec-acf/2", "visrec-acf/1")
CONFIGS: dict[str, type[ACFConfig] | type[SASRecConfig]] = {
    "acf": ACFConfig,
    "sasrec": SASRecConfig,
}
SERVED = tuple(CONFIGS)  # the models a checkpoint can hold
# `visrec reproduce` writes the checkpoint of the row it chose to serve (best on validation
# among the rows of SERVED models) as <work dir>/SERVED_FILE; `visrec-serve` serves it
SERVED_FILE = "served.pt"


DEFAULT_PROFILE_SIZE = 9


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    config: ACFConfig | SASRecConfig
    state: dict[str, torch.Tensor]
    user_ids: list[int]  # raw id of user index u
    item_ids: list[int]  # raw id of item index i + 1
    features: dict[str, Any]  # backbone, input_size, feature_dim, inputs_hash
    item_popularity: list[int] = field(default_factory=list)  # training interactions per item
    train_config: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    code_version: str = ""
    projection: dict[str, torch.Tensor] | None = None  # Projection.as_state(); None: raw
    model: str = "acf"  # one of SERVED; SASRec reads no features (they still fix the items)

    @property
    def profile_size(self) -> int:
        """How many of a user's newest items the model was trained to read (the serving
        contract: the tutorial's 9 for checkpoints that do not say)."""
        return int(self.train_config.get("profile_size", DEFAULT_PROFILE_SIZE))

    @property
    def feature_map(self) -> Projection | None:
        """What raw features go through before the model (None: nothing)."""
        return Projection.from_state(self.projection) if self.projection else None

    def build_model(
        self, features: np.ndarray | torch.Tensor, *, inputs_hash: str, item_ids: Sequence[int]
    ) -> ACF | SASRec:
        """The trained model on raw ``features`` (N, K, C), which must be the ones it was trained
        on."""
        self.check_features(inputs_hash, item_ids)
        if isinstance(self.config, SASRecConfig):
            return self.serving_model()
        model = ACF(self.config, project(features, self.feature_map))
        model.load_state_dict(self.state)
        return model.eval()

    def serving_model(self) -> ACF | SASRec:
        """The trained model without features (ACF's go through :mod:`service.model.tables`)."""
        model = (
            SASRec(self.config) if isinstance(self.config, SASRecConfig) else ACF(self.config, None)
        )
        model.load_state_dict(self.state)
        return model.eval()

    def check_features(self, inputs_hash: str, item_ids: Sequence[int]) -> None:
        """Raise CheckpointError unless features with this hash and item order are the ones
        the model was trained on."""
        if inputs_hash != self.features.get("inputs_hash"):
            raise CheckpointError(
                f"features do not match the checkpoint: inputs hash {inputs_hash[:12]}… "
                f"but the model was trained on {str(self.features.get('inputs_hash'))[:12]}… "
                f"({self.features.get('backbone')}); extract features for the same images "
                "with the same backbone"
            )
        if list(item_ids) != self.item_ids:
            raise CheckpointError("features list items in another order than the checkpoint")


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    payload = {"format": FORMAT, **asdict(ckpt), "config": asdict(ckpt.config)}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    return read_checkpoint(path, map_location=map_location)[0]


def read_checkpoint(
    path: Path, *, map_location: str | torch.device = "cpu"
) -> tuple[Checkpoint, str]:
    """The checkpoint and the sha256 (hex) of the bytes it was read from: checkpoints trained by
    the same code share ``code_version``, the digest tells them apart."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()  # read once: the digest names exactly what was loaded
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for bytes that are not a torch file
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") not in READABLE:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    payload.pop("format")
    kind = payload.get("model", "acf")
    if kind not in CONFIGS:
        raise CheckpointError(
            f"{path} holds a {kind!r} model; this code serves {', '.join(SERVED)}"
        )
    try:
        payload["config"] = CONFIGS[kind](**payload["config"])
        ckpt = Checkpoint(**payload)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is an incomplete {FORMAT} checkpoint: {err}") from err
    return ckpt, hashlib.sha256(data).hexdigest()


def code_version() -> str:
    """Package version, plus the git commit when run from a checkout."""
    try:
        version = metadata.version("visrec-service")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}"
