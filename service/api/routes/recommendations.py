"""``/recommend``: the top-k items for a stored user, or for a history sent in the body, with
optional filters on the items' attributes (:mod:`service.filters`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.schemas import (
    DIVERSITY,
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    MAX_ATTRIBUTES,
    MAX_FILTER_VALUES,
    MAX_K,
    UNKNOWN_ATTRIBUTES,
    UNKNOWN_ITEMS_OR_ATTRIBUTES,
    Condition,
    Filters,
    HistoryRequest,
    RecommendResponse,
    ScoredItem,
    UserIdInPath,
    conditions,
)
from service.api.security import Guards
from service.api.state import State, StateDep
from service.filters import ItemFilter, named
from service.recommender import Query as RecQuery
from service.recommender import Recommendation

# GET's query parameters: any other name is refused (a misspelt filter must not be ignored)
FILTER_PARAMETERS = (
    "genres",
    "exclude_genres",
    "year_min",
    "year_max",
    "attribute",
    "exclude_attribute",
    "exclude_items",
)
GET_PARAMETERS = frozenset({"k", "offset", "exclude_seen", "diversity", *FILTER_PARAMETERS})
LIST = r"^[^,]+(,[^,]+)*$"  # comma-separated, no empty entry
IDS = r"^\d{1,18}(,\d{1,18})*$"  # ids of up to 18 digits: an int64 each
Year = Annotated[int | None, Query(ge=0, le=9999)]


def _listed(description: str, pattern: str = LIST) -> object:
    return Query(pattern=pattern, max_length=100 * MAX_FILTER_VALUES, description=description)


async def get_filters(
    request: Request,
    genres: Annotated[
        str | None, _listed("comma-separated: at least one of these genres (e.g. Comedy,Drama)")
    ] = None,
    exclude_genres: Annotated[str | None, _listed("comma-separated: none of these genres")] = None,
    year_min: Year = None,
    year_max: Year = None,
    attribute: Annotated[
        list[Condition] | None,
        Query(
            max_length=MAX_ATTRIBUTES,
            description="name:value,value (repeatable): at least one of these values of the "
            "attribute named, e.g. attribute=colour:red,blue; a name no item has is 422",
        ),
    ] = None,
    exclude_attribute: Annotated[
        list[Condition] | None,
        Query(
            max_length=MAX_ATTRIBUTES,
            description="name:value,value (repeatable): none of these values",
        ),
    ] = None,
    exclude_items: Annotated[
        str | None, _listed("comma-separated item ids never to return", IDS)
    ] = None,
) -> Filters | None:
    """GET's filters (None: none given); a query parameter the route does not have is 422."""
    unknown = sorted(set(request.query_params) - GET_PARAMETERS)
    if unknown:
        known = ", ".join(sorted(GET_PARAMETERS))
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": f"unknown parameter (known: {known})"}
                | {"type": "extra_forbidden"}
                for name in unknown
            ]
        )
    if all(request.query_params.get(name) is None for name in FILTER_PARAMETERS):
        return None
    try:
        return Filters(
            genres=_split(genres),
            exclude_genres=_split(exclude_genres),
            year_min=year_min,
            year_max=year_max,
            attributes=conditions(attribute),
            exclude_attributes=conditions(exclude_attribute),
            exclude_items=[int(i) for i in _split(exclude_items)],
        )
    except ValidationError as err:  # a genre too long, too many ids
        raise RequestValidationError(
            [{**e, "loc": ("query", *map(str, e["loc"]))} for e in err.errors()]
        ) from err


def router(guards: Guards) -> APIRouter:
    routes = APIRouter(dependencies=guards.read, responses=GUARDED | INVALID_FIELDS)

    @routes.get(
        "/recommend/{user_id}", response_model=RecommendResponse, responses=UNKNOWN_ATTRIBUTES
    )
    async def recommend_user(
        user_id: UserIdInPath,
        state: StateDep,
        filters: Annotated[Filters | None, Depends(get_filters)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_K)] = 0,
        exclude_seen: bool = True,
        diversity: Annotated[float, Query(ge=0, le=1, description=DIVERSITY)] = 0.0,
    ) -> RecommendResponse:
        """The top ``k`` items for a stored user (after ``offset``), best first, unseen ones only
        unless ``exclude_seen=false``, and only those that pass the filters given (then
        ``passing`` says how many did). A user with no profile gets popular items
        (``fallback``); while the profile store is down, the answer is ranked from this
        server's cached copy of the profile (``degraded``). A parameter not listed here is
        refused (422)."""
        with state.metrics.store_stage.time():
            read = await state.store.read([user_id])  # cached or empty when the store is down
        (profile,) = read.profiles
        seen = profile.seen if exclude_seen else frozenset()
        with state.metrics.model_stage.time():
            query = _query(
                state, user_id, profile.recent, seen, k, offset, filters, diversity, profile.seconds
            )
            rec = await state.batcher.submit(query)
        named = state.feedback.name(user_id, rec)
        return _response(user_id, rec, filters, degraded=read.degraded, request_id=named)

    @routes.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=JSON_BODY | UNKNOWN_ITEMS_OR_ATTRIBUTES,
    )
    async def recommend_history(body: HistoryRequest, state: StateDep) -> RecommendResponse:
        """The top ``k`` items for a history given in the body (raw item ids, oldest first; the
        last 9 count), e.g. for an anonymous visitor, only those that pass ``filters`` when
        given. Needs no profile store."""
        state.engine.require_known(body.history)
        seen = set(body.history) if body.exclude_seen else set()
        query = _query(
            state,
            None,
            body.history,
            seen,
            body.k,
            body.offset,
            body.filters,
            body.diversity,
            body.timestamps,
        )
        rec = await state.batcher.submit(query)
        named = state.feedback.name(None, rec)
        return _response(None, rec, body.filters, request_id=named)

    return routes


def _split(values: str | None) -> list[str]:
    return values.split(",") if values else []  # as given: a genre is matched exactly


def _spec(filters: Filters) -> ItemFilter:
    return ItemFilter(
        frozenset(filters.genres),
        frozenset(filters.exclude_genres),
        filters.year_min,
        filters.year_max,
        named(filters.attributes),
        named(filters.exclude_attributes),
    )


def _query(
    state: State,
    user_id: str | None,
    history: list[int] | tuple[int, ...],
    seen: Collection[int],
    k: int,
    offset: int,
    filters: Filters | None,
    diversity: float = 0.0,
    times: Sequence[float] | None = None,
) -> RecQuery:
    """The engine's query: ``seen``, switched-off items and the filter's excluded ids never
    returned, and only the catalogue items that pass its attribute conditions (searched inside
    the index)."""
    off = state.patches.off  # switched off (PATCH /items)
    if filters is None:
        excluded = {*seen, *off} if off else seen
        return RecQuery(user_id, history, excluded, k, offset, diversity=diversity, times=times)
    spec = _spec(filters)
    only = state.catalogue.attributes(state.patches.changes).passing(spec) if spec else None
    excluded = {*seen, *off, *filters.exclude_items}
    return RecQuery(user_id, history, excluded, k, offset, only, diversity, times)


def _response(
    user_id: str | None,
    rec: Recommendation,
    filters: Filters | None = None,
    *,
    degraded: bool = False,
    request_id: str | None = None,
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
        passing=None if filters is None else rec.passing,
        reason=None if items else _why_empty(rec, filters),
        request_id=request_id,
        arm=rec.arm or None,
    )


def _why_empty(rec: Recommendation, filters: Filters | None) -> str:
    if filters is not None and not rec.passing:
        return "no item passes the filters (and is not excluded or already seen)"
    return "nothing is left to recommend after the items excluded and already seen"
