"""``/recommend``: the top-k items for a stored user, or for a history sent in the body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.schemas import (
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    MAX_K,
    UNKNOWN_ITEMS,
    HistoryRequest,
    RecommendResponse,
    ScoredItem,
    UserIdInPath,
)
from service.api.security import Guards
from service.api.state import StateDep
from service.recommender import Query as RecQuery
from service.recommender import Recommendation


def router(guards: Guards) -> APIRouter:
    routes = APIRouter(dependencies=guards.read, responses=GUARDED | INVALID_FIELDS)

    @routes.get("/recommend/{user_id}", response_model=RecommendResponse)
    async def recommend_user(
        user_id: UserIdInPath,
        state: StateDep,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_K)] = 0,
        exclude_seen: bool = True,
    ) -> RecommendResponse:
        """The top ``k`` items for a stored user (after ``offset``), best first, unseen ones only
        unless ``exclude_seen=false``. A user with no profile gets popular items
        (``fallback``); while the profile store is down, the answer is ranked from this
        server's cached copy of the profile (``degraded``)."""
        with state.metrics.store_stage.time():
            read = await state.store.read([user_id])  # cached or empty when the store is down
        (profile,) = read.profiles
        seen = profile.seen if exclude_seen else frozenset()
        with state.metrics.model_stage.time():
            rec = await state.batcher.submit(RecQuery(user_id, profile.recent, seen, k, offset))
        return _response(user_id, rec, degraded=read.degraded)

    @routes.post(
        "/recommend", response_model=RecommendResponse, responses=JSON_BODY | UNKNOWN_ITEMS
    )
    async def recommend_history(body: HistoryRequest, state: StateDep) -> RecommendResponse:
        """The top ``k`` items for a history given in the body (raw item ids, oldest first; the
        last 9 count), e.g. for an anonymous visitor. Needs no profile store."""
        state.engine.require_known(body.history)
        seen = set(body.history) if body.exclude_seen else set()
        rec = await state.batcher.submit(RecQuery(None, body.history, seen, body.k, body.offset))
        return _response(None, rec)

    return routes


def _response(
    user_id: str | None, rec: Recommendation, *, degraded: bool = False
) -> RecommendResponse:
    pairs = zip(rec.items, rec.scores, strict=True)
    if rec.fallback:  # the engine ranks popular items by their interaction counts
        items = [ScoredItem(item_id=i, score=None, popularity=round(n)) for i, n in pairs]
    else:
        items = [ScoredItem(item_id=i, score=s, popularity=None) for i, s in pairs]
    return RecommendResponse(
        user_id=user_id,
        items=items,
        model_version=rec.version,  # of the engine that answered, also across a reload
        fallback=rec.fallback,
        degraded=degraded,
    )
