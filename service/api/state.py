"""What the lifespan builds and the routes read, and the one way they read it: a typed
dependency (``StateDep``; ``CatalogueDep`` for the routes that need nothing but the catalogue,
e.g. an app serving only item pages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.api.batcher import MicroBatcher
from service.api.feedback import Feedback
from service.api.items import Items
from service.api.metrics import Metrics
from service.api.patches import Patches
from service.catalogue import Catalogue
from service.engine import ModelSlot
from service.recommender import Query, Recommendation, Recommender
from service.store.epoch import EpochWatch
from service.store.resilient import ResilientStore


@dataclass
class State:
    models: ModelSlot  # the serving engine, which POST /admin/reload and SIGHUP replace
    store: ResilientStore
    store_name: str
    batcher: MicroBatcher[Query, Recommendation]
    watch: EpochWatch | None  # whether Redis lost its data; None for the in-process store
    items: Items  # added items
    patches: Patches  # items switched off, attributes changed (PATCH /items)
    catalogue: Catalogue  # titles and images, for the page
    metrics: Metrics
    feedback: Feedback  # answers named for POST /feedback

    @property
    def engine(self) -> Recommender:
        """The engine serving now: a request that needs it twice reads it once (a swap may
        come in between)."""
        return self.models.engine

    def as_lifespan_state(self) -> dict[str, object]:
        """What the lifespan yields: this, and the catalogue under its own name."""
        return {"app_state": self, "catalogue": self.catalogue}


# async: no thread-pool hand-off per request
async def _state(request: Request) -> State:
    state: State = request.state.app_state
    return state


async def _catalogue(request: Request) -> Catalogue:
    catalogue: Catalogue = request.state.catalogue
    return catalogue


StateDep = Annotated[State, Depends(_state)]
CatalogueDep = Annotated[Catalogue, Depends(_catalogue)]
