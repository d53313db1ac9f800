"""Request and response bodies (pydantic lives only at this edge)."""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_K = 1000
MAX_BATCH = 1000
MAX_HISTORY = 1000


class ScoredItem(BaseModel):
    item_id: int
    score: float


class RecommendResponse(BaseModel):
    user_id: str | None
    items: list[ScoredItem]
    model_version: str
    fallback: bool = Field(description="popular items: nothing was known about the user")


class HistoryRequest(BaseModel):
    history: list[int] = Field(default_factory=list, max_length=MAX_HISTORY)
    k: int = Field(20, ge=1, le=MAX_K)
    offset: int = Field(0, ge=0, le=MAX_K)
    exclude_seen: bool = True


class InteractionIn(BaseModel):
    user_id: str = Field(min_length=1, max_length=128)
    item_id: int
    timestamp: float | None = None
    event_id: str | None = Field(None, min_length=1, max_length=128)


class InteractionsRequest(BaseModel):
    events: list[InteractionIn] = Field(min_length=1, max_length=MAX_BATCH)


class InteractionsResponse(BaseModel):
    received: int
    applied: int


class ProfileItem(BaseModel):
    item_id: int
    attention: float
    components: list[list[float]] = Field(description="7x7 component attention, sums to 1")


class ExplainRequest(BaseModel):
    history: list[int] = Field(max_length=MAX_HISTORY, description="raw item ids, oldest first")
    item_id: int


class ExplainResponse(BaseModel):
    user_id: str | None
    item_id: int
    score: float
    profile: list[ProfileItem]
    model_version: str


class Ready(BaseModel):
    ready: bool
    model_version: str
    items: int
    index: str
    store: str
