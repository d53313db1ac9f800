"""Service settings, read from the environment (``VISREC_*``) by entry points only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VISREC_")

    checkpoint: Path
    features: Path
    redis_url: str | None = None  # None: an in-process profile store
    redis_prefix: str = "visrec"
    device: str = "auto"
    index: Literal["flat", "ivf", "hnsw"] = "flat"
