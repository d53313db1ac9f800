"""The HTTP service: an app factory whose lifespan loads the model, index and profile store."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.batcher import MicroBatcher
from service.api.metrics import Metrics
from service.api.schemas import (
    MAX_K,
    ExplainRequest,
    ExplainResponse,
    HistoryRequest,
    InteractionsRequest,
    InteractionsResponse,
    ProfileItem,
    Ready,
    RecommendResponse,
    ScoredItem,
)
from service.api.ui import install_ui
from service.catalogue import load_catalogue
from service.config import Settings
from service.model.checkpoint import load_checkpoint
from service.model.feature_store import load_features
from service.recommender import (
    Query as RecQuery,
)
from service.recommender import (
    Recommendation,
    Recommender,
    UnknownItemsError,
    load_recommender,
)
from service.runtime import pick_device
from service.store.profiles import Interaction, MemoryProfileStore, ProfileStore, RedisProfileStore


@dataclass
class State:
    engine: Recommender
    store: ProfileStore
    store_name: str
    batcher: MicroBatcher[RecQuery, Recommendation]


def _load(settings: Settings) -> Recommender:
    device = pick_device(settings.device)
    if device.type == "cpu":
        # A request's model work is a few small ops: extra intra-op threads only add hand-off
        # latency, and the web server needs the other cores.
        torch.set_num_threads(settings.cpu_threads)
    features, meta = load_features(settings.features)
    ckpt = load_checkpoint(settings.checkpoint, map_location=device)
    return load_recommender(
        ckpt,
        features,
        inputs_hash=meta.inputs_hash,
        item_ids=meta.item_ids,
        device=device,
        index=settings.index,
    )


def create_app(
    settings: Settings, *, profiles: Mapping[str, Sequence[int]] | None = None
) -> FastAPI:
    """``profiles``: histories (raw item ids, oldest first) loaded into the store at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        engine = await run_in_threadpool(_load, settings)
        catalogue = await run_in_threadpool(load_catalogue, settings.data)  # titles, images
        if settings.redis_url:
            store: ProfileStore = RedisProfileStore.from_url(
                settings.redis_url, prefix=settings.redis_prefix
            )
            name = "redis"
        else:
            store, name = MemoryProfileStore(), "memory"
        if profiles:
            await store.load(profiles)
        # Everything loaded so far lives as long as the app: keep it out of the cyclic garbage
        # collector's full passes, whose pauses were the p99 of a loaded server.
        gc.freeze()
        try:
            window = settings.batch_window_ms / 1000
            async with MicroBatcher(engine.recommend, window_s=window) as batcher:
                yield {"app_state": State(engine, store, name, batcher), "catalogue": catalogue}
        finally:
            await store.close()

    app = FastAPI(title="visrec", lifespan=lifespan)
    metrics = Metrics()
    metrics.install(app)
    _routes(app, metrics)
    install_ui(app)

    @app.exception_handler(UnknownItemsError)
    async def unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return JSONResponse(
            status_code=422, content={"detail": str(exc), "unknown_item_ids": exc.items}
        )

    return app


def _state(request: Request) -> State:
    state: State = request.state.app_state
    return state


StateDep = Annotated[State, Depends(_state)]


def _response(user_id: str | None, rec: Recommendation, version: str) -> RecommendResponse:
    items = [ScoredItem(item_id=i, score=s) for i, s in zip(rec.items, rec.scores, strict=True)]
    return RecommendResponse(
        user_id=user_id, items=items, model_version=version, fallback=rec.fallback
    )


def _routes(app: FastAPI, metrics: Metrics) -> None:
    store_stage, model_stage = metrics.stages.labels("store"), metrics.stages.labels("model")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready)
    async def readyz(state: StateDep) -> Ready | JSONResponse:
        store_ok = await state.store.ping()
        ready = Ready(
            ready=store_ok,
            model_version=state.engine.version,
            items=len(state.engine.item_ids),
            index=state.engine.index.kind,
            store=f"{state.store_name}: {'ok' if store_ok else 'unreachable'}",
        )
        return ready if store_ok else JSONResponse(status_code=503, content=ready.model_dump())

    @app.get("/recommend/{user_id}", response_model=RecommendResponse)
    async def recommend_user(
        user_id: str,
        state: StateDep,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_K)] = 0,
        exclude_seen: bool = True,
    ) -> RecommendResponse:
        with store_stage.time():
            (profile,) = await state.store.profiles([user_id])
        seen = profile.seen if exclude_seen else frozenset()
        with model_stage.time():
            rec = await state.batcher.submit(RecQuery(user_id, profile.recent, seen, k, offset))
        return _response(user_id, rec, state.engine.version)

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend_history(body: HistoryRequest, state: StateDep) -> RecommendResponse:
        unknown = state.engine.unknown_items(body.history)
        if unknown:
            raise UnknownItemsError(unknown)
        seen = set(body.history) if body.exclude_seen else set()
        rec = await state.batcher.submit(RecQuery(None, body.history, seen, body.k, body.offset))
        return _response(None, rec, state.engine.version)

    @app.post("/interactions", response_model=InteractionsResponse)
    async def interactions(body: InteractionsRequest, state: StateDep) -> InteractionsResponse:
        unknown = state.engine.unknown_items([e.item_id for e in body.events])
        if unknown:  # nothing of the batch is applied
            raise UnknownItemsError(unknown)
        events = [Interaction(e.user_id, e.item_id, e.timestamp, e.event_id) for e in body.events]
        applied = await state.store.add(events)
        return InteractionsResponse(received=len(events), applied=applied)

    @app.get("/explain/{user_id}", response_model=ExplainResponse)
    async def explain_user(user_id: str, item_id: int, state: StateDep) -> ExplainResponse:
        (history,) = await state.store.recent([user_id])
        return await _explain(state, user_id, history, item_id)

    @app.post("/explain", response_model=ExplainResponse)
    async def explain_history(body: ExplainRequest, state: StateDep) -> ExplainResponse:
        unknown = state.engine.unknown_items(body.history)
        if unknown:
            raise UnknownItemsError(unknown)
        return await _explain(state, None, body.history, body.item_id)


async def _explain(
    state: State, user_id: str | None, history: Sequence[int], item_id: int
) -> ExplainResponse:
    """The attentions behind ``item_id`` over the profile that ``/recommend`` ranks with."""
    why = await run_in_threadpool(state.engine.explain, user_id, history, item_id)
    profile = [
        ProfileItem(item_id=raw, attention=float(a), components=c.tolist())
        for raw, a, c in zip(
            state.engine.raw_ids(why.profile),
            why.item_attention,
            why.component_attention,
            strict=True,
        )
    ]
    return ExplainResponse(
        user_id=user_id,
        item_id=item_id,
        score=why.score,
        profile=profile,
        model_version=state.engine.version,
    )
