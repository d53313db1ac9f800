"""``POST /feedback``: what users did with an answer (items shown, items chosen), counted
against the model version and experiment arm that gave it; ``GET /feedback``: the counts."""

from __future__ import annotations

from fastapi import APIRouter

from service.abtest import wilson
from service.api.schemas import (
    FEEDBACK_REFUSED,
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    STORE_NEEDED,
    FeedbackRequest,
    FeedbackResponse,
    FeedbackTotals,
)
from service.api.security import Guards
from service.api.state import StateDep
from service.store.feedback import Totals
from service.store.profiles import Interaction


def router(guards: Guards) -> APIRouter:
    routes = APIRouter(responses=GUARDED | INVALID_FIELDS)

    @routes.post(
        "/feedback",
        response_model=FeedbackResponse,
        dependencies=guards.write,
        responses=JSON_BODY | FEEDBACK_REFUSED | STORE_NEEDED,
    )
    async def feedback(body: FeedbackRequest, state: StateDep) -> FeedbackResponse:
        """Record which items of an answer (its ``request_id``) were shown and which were
        clicked. Each impression and click is counted once per answer and item, so sending
        the same feedback again changes nothing; a click is also an interaction of the
        answer's user (event id ``click:<request_id>:<item>``, applied at most once)."""
        counted = await state.feedback.count(body.request_id, body.impressions, body.clicks)
        applied, user = 0, counted.answer.user_id
        if user is not None and body.clicks:  # again on a retry: the event ids keep it once
            state.engine.require_known(body.clicks)
            clicks = dict.fromkeys(body.clicks)
            events = [Interaction(user, i, None, f"click:{body.request_id}:{i}") for i in clicks]
            applied = await state.store.add(events)
        return FeedbackResponse(
            request_id=body.request_id,
            model_version=counted.answer.version,
            arm=counted.answer.arm or None,
            impressions=len(counted.impressions),
            clicks=len(counted.clicks),
            applied=applied,
        )

    @routes.get("/feedback", response_model=list[FeedbackTotals], dependencies=guards.read)
    async def totals(state: StateDep) -> list[FeedbackTotals]:
        """Impressions, clicks and click-through rate (with its 95% interval) per model
        version and experiment arm, over every process that shares the store."""
        counts = await state.feedback.totals()
        return [_totals(v, a, t) for (v, a), t in sorted(counts.items())]

    return routes


def _totals(version: str, arm: str, t: Totals) -> FeedbackTotals:
    return FeedbackTotals(
        model_version=version,
        arm=arm or None,
        impressions=t.impressions,
        clicks=t.clicks,
        ctr=t.clicks / t.impressions if t.impressions else None,
        ctr_95=wilson(t.clicks, t.impressions) if t.impressions else None,
        clicks_by_rank={str(r): n for r, n in sorted(t.by_rank.items())},
    )
