"""``/explain``: the item-level and component-level attentions behind a recommendation."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.schemas import (
    GUARDED,
    JSON_BODY,
    STORE_NEEDED,
    UNKNOWN_ITEMS,
    ExplainRequest,
    ExplainResponse,
    ProfileItem,
    SharedTag,
    UserIdInPath,
)
from service.api.security import Guards
from service.api.state import State, StateDep


def router(guards: Guards) -> APIRouter:
    routes = APIRouter(dependencies=guards.read, responses=GUARDED | UNKNOWN_ITEMS)

    @routes.get("/explain/{user_id}", response_model=ExplainResponse, responses=STORE_NEEDED)
    async def explain_user(user_id: UserIdInPath, item_id: int, state: StateDep) -> ExplainResponse:
        """Why ``item_id`` scores as it does for a stored user: the item-level attention over
        their last items and each item's 7x7 component attention, and the score (a served
        SASRec gives its newest position's attention over those items, and no components)."""
        (profile,) = await state.store.profiles([user_id])
        return await _explain(state, user_id, profile.recent, item_id, profile.seconds)

    @routes.post("/explain", response_model=ExplainResponse, responses=JSON_BODY)
    async def explain_history(body: ExplainRequest, state: StateDep) -> ExplainResponse:
        """The same explanation for a history given in the body."""
        state.engine.require_known(body.history)
        return await _explain(state, None, body.history, body.item_id, body.timestamps)

    return routes


async def _explain(
    state: State,
    user_id: str | None,
    history: Sequence[int],
    item_id: int,
    times: Sequence[float] | None,
) -> ExplainResponse:
    """The attentions behind ``item_id`` over the profile that ``/recommend`` ranks with."""
    # one model for the whole answer, also across a reload: the one /recommend ranks with
    engine, arm = state.models.serving(user_id)
    why = await run_in_threadpool(engine.explain, user_id, history, item_id, times)
    heatmaps = why.component_attention
    profile = [
        ProfileItem(
            item_id=raw,
            attention=float(a),
            components=None if heatmaps is None else heatmaps[j].tolist(),
        )
        for j, (raw, a) in enumerate(
            zip(engine.raw_ids(why.profile), why.item_attention, strict=True)
        )
    ]
    return ExplainResponse(
        user_id=user_id,
        item_id=item_id,
        score=why.score,
        profile=profile,
        tags=[SharedTag(tag=t, attention=a) for t, a in why.tags.items()],
        model_version=engine.version,
        arm=arm or None,
    )
