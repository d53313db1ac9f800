"""``POST /interactions``: events that update users' profiles."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from service.api.schemas import (
    EVENTS_REFUSED,
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    MAX_CLOCK_SKEW_S,
    STORE_NEEDED,
    InteractionsRequest,
    InteractionsResponse,
)
from service.api.security import Guards
from service.api.state import StateDep
from service.errors import ServiceError
from service.store.profiles import Interaction


def router(guards: Guards) -> APIRouter:
    routes = APIRouter(dependencies=guards.write, responses=INVALID_FIELDS)

    @routes.post(
        "/interactions",
        response_model=InteractionsResponse,
        responses=GUARDED | JSON_BODY | EVENTS_REFUSED | STORE_NEEDED,
    )
    async def interactions(body: InteractionsRequest, state: StateDep) -> InteractionsResponse:
        """Record a batch of interactions: applied whole or not at all, each event with an
        ``event_id`` at most once. The next ``/recommend`` of those users sees them."""
        state.engine.require_known([e.item_id for e in body.events])  # else none is applied
        _require_present(body)
        events = [Interaction(e.user_id, e.item_id, e.timestamp, e.event_id) for e in body.events]
        applied = await state.store.add(events)
        return InteractionsResponse(received=len(events), applied=applied)

    return routes


class FutureTimestamps(ServiceError):
    status = 422
    code = "future_timestamps"

    def __init__(self, timestamps: list[float]) -> None:
        super().__init__(
            f"event timestamp(s) more than {MAX_CLOCK_SKEW_S // 3600} h ahead of the server's "
            f"clock: {', '.join(map(str, timestamps))}; nothing was applied"
        )
        self.timestamps = timestamps

    def fields(self) -> dict[str, Any]:
        return {"timestamps": self.timestamps}


def _require_present(body: InteractionsRequest) -> None:
    """Refuse events from the future: one would stay a user's newest item for good."""
    latest = time.time() + MAX_CLOCK_SKEW_S
    ahead = [e.timestamp for e in body.events if e.timestamp is not None and e.timestamp > latest]
    if ahead:
        raise FutureTimestamps(ahead)
