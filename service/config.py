"""Service settings, read from the environment (``VISREC_*``) by entry points only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VISREC_")

    checkpoint: Path
    features: Path
    redis_url: str | None = None  # None: an in-process profile store
    redis_prefix: str = "visrec"
    device: str = "auto"
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    # How long a request waits for others to share its model call. Requests that queue while
    # a call runs share the next one anyway; a 1.5 ms window added 1.6 ms at one connection and
    # gave no clear gain under load (benchmarks/serve_load.py, 2 cores), hence 0.
    batch_window_ms: Annotated[float, Field(ge=0, le=50)] = 0.0
    cpu_threads: Annotated[int, Field(ge=1)] = 1  # torch threads for the model on the CPU
    # The dataset folder whose items.csv titles and images the explanation page shows; without
    # one the page shows item ids instead of images.
    data: Path | None = None
