"""Request and response bodies (pydantic lives only at this edge)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Self

from fastapi import Path
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from service.store.profiles import (
    MAX_CLOCK_SKEW_S,
    MAX_TIMESTAMP_S,
    USER_ID_CHARS,
    USER_ID_PATTERN,
)

MAX_K = 1000
MAX_BATCH = 1000
MAX_HISTORY = 1000


class Body(BaseModel):
    """A request body, validated strictly: JSON types are taken as the schema states them, not
    coerced (``0`` is not ``false``, ``"5"`` is not ``5``), so the service accepts exactly what its
    schema documents. Integer fields are ``Integer``."""

    model_config = ConfigDict(strict=True)


def _whole_number(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integer: a number without a fraction, ``2.0`` included, which strict ``int``
# refuses (lax ``int`` takes ``"2"`` and ``true`` as well).
Integer = Annotated[int, BeforeValidator(_whole_number)]


class ScoredItem(BaseModel):
    item_id: int
    score: float | None = Field(
        description="the model's score (higher is better); null for popular items (fallback)"
    )
    popularity: int | None = Field(
        None, description="for popular items (fallback): how many users interacted with it"
    )


class RecommendResponse(BaseModel):
    user_id: str | None
    items: list[ScoredItem]
    model_version: str
    fallback: bool = Field(description="popular items: nothing was known about the user")
    degraded: bool = Field(
        False,
        description="the profile store did not answer in time: ranked from this server's cached "
        "copy of the user's profile, or popular items when it has none (then fallback is true)",
    )
    passing: int | None = Field(
        None,
        description="with filters: how many items passed them (and were not excluded); the "
        "answer has min(k, passing - offset) items",
    )
    reason: str | None = Field(None, description="why the answer is empty, when it is")
    request_id: str | None = Field(
        None,
        description="names this answer in POST /feedback (what was shown and clicked), for "
        "VISREC_FEEDBACK_WINDOW_S seconds; null when feedback is off",
    )
    arm: str | None = Field(
        None,
        description="the experiment arm that answered, <experiment id>/<arm> (visrec "
        "experiment); null while no experiment runs",
    )


MAX_FILTER_VALUES = 1000  # genres or excluded item ids in one filter
DIVERSITY = (
    "0..1: re-rank for variety (maximal marginal relevance over the item vectors): 0 is the "
    "model's ranking, higher trades score for items less alike the ones above them"
)
GenreName = Annotated[str, Field(min_length=1, max_length=100)]
AttributeName = Annotated[str, Field(min_length=1, max_length=100)]
AttributeValues = Annotated[list[GenreName], Field(min_length=1, max_length=MAX_FILTER_VALUES)]
MAX_ATTRIBUTES = 32  # names in one filter
# Characters no text shown on the page may hold: control characters (C0, DEL, C1: also what
# invalid UTF-8 often becomes, as the form parser falls back to Latin-1) and bidirectional
# overrides, which can make a text read as something else (U+202E); a regex class's inside
UNSAFE = r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
# An attribute condition in a query or a form, name:value,value (names and values as the
# body's: up to 100 characters, up to 1,000 values), so that one valid by its schema is never
# refused by the body's
Condition = Annotated[
    str,
    StringConstraints(
        pattern=rf"^[^:,{UNSAFE}]{{1,100}}:[^,{UNSAFE}]{{1,100}}(,[^,{UNSAFE}]{{1,100}})*$",
        max_length=101 * MAX_FILTER_VALUES + 101,
    ),
]


def conditions(given: list[str] | None) -> dict[str, list[str]]:
    """``name:a,b`` conditions as {name: [a, b]}; a name given twice has all its values."""
    out: dict[str, list[str]] = {}
    for one in given or ():
        name, values = one.split(":", 1)
        out.setdefault(name, []).extend(values.split(","))
    return out


# the bounds before the validator: after it, pydantic writes them into an optional field's
# JSON Schema as "ge"/"le", which no client reads, instead of "minimum"/"maximum"
Year = Annotated[int, Field(ge=0, le=9999), BeforeValidator(_whole_number)]


class Filters(Body):
    """What the answer may contain: every condition given holds for every item in it. A name
    this schema does not have is refused (422), so a misspelt filter is never silently
    ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")
    genres: list[GenreName] = Field(
        default_factory=list,
        max_length=MAX_FILTER_VALUES,
        description="at least one of these genres (empty: any)",
    )
    exclude_genres: list[GenreName] = Field(
        default_factory=list, max_length=MAX_FILTER_VALUES, description="none of these genres"
    )
    year_min: Year | None = Field(None, description="released in or after (the title's year)")
    year_max: Year | None = Field(None, description="released in or before")
    attributes: dict[AttributeName, AttributeValues] = Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        description="for each attribute named (items.csv's other columns, POST /items's "
        'attributes, PATCH /items\'s), at least one of its values, e.g. {"colour": ["red", '
        '"blue"]}; a name no item has is refused (422)',
        examples=[{"colour": ["red", "blue"]}],
    )
    exclude_attributes: dict[AttributeName, AttributeValues] = Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        description="for each attribute named, none of its values",
    )
    exclude_items: list[Integer] = Field(
        default_factory=list, max_length=MAX_FILTER_VALUES, description="item ids never to return"
    )


Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP_S, allow_inf_nan=False)]


class HistoryBody(Body):
    """A history given in the body, and optionally when each of its items came."""

    history: list[Integer] = Field(
        default_factory=list, max_length=MAX_HISTORY, description="raw item ids, oldest first"
    )
    timestamps: list[Timestamp] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="when each history item came, seconds since the epoch, one per item: a "
        "model that weighs how long ago each came reads them (omitted: all in one visit)",
    )

    @model_validator(mode="after")
    def _one_time_per_item(self) -> Self:
        if self.timestamps is not None and len(self.timestamps) != len(self.history):
            raise ValueError(
                f"timestamps gives {len(self.timestamps)} times for {len(self.history)} "
                "history items: give one per item, or none"
            )
        return self


class HistoryRequest(HistoryBody):
    k: Integer = Field(20, ge=1, le=MAX_K)
    offset: Integer = Field(0, ge=0, le=MAX_K)
    exclude_seen: bool = True
    filters: Filters | None = None
    diversity: float = Field(0.0, ge=0, le=1, description=DIVERSITY)


MAX_USER_ID = 2**53 - 1  # exact in a double, as JSON tools read numbers


def _decimal_user_id(value: object) -> object:
    """Dataset user ids are integers: ``7`` is taken as ``"7"`` (other types stay refused)."""
    number = _whole_number(value)  # 7.0 is the integer 7, as JSON Schema reads it
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number <= MAX_USER_ID:
        return str(number)
    return value


UserIdText = Annotated[
    str, StringConstraints(min_length=1, max_length=USER_ID_CHARS, pattern=USER_ID_PATTERN)
]
# The same rule for ids in URL paths (reads), so that no id is read that writes refuse
UserIdInPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=USER_ID_CHARS,
        pattern=USER_ID_PATTERN,
        description="1-128 characters without '/' or control characters",
    ),
]
UserId = Annotated[
    UserIdText,
    BeforeValidator(
        _decimal_user_id,
        json_schema_input_type=UserIdText | Annotated[int, Field(ge=0, le=MAX_USER_ID)],
    ),
    Field(
        description="1-128 characters without '/' or control characters, or a non-negative "
        'integer (taken as its decimal string: 7 and "7" are the same user)'
    ),
]


class InteractionIn(Body):
    user_id: UserId
    item_id: Integer
    timestamp: float | None = Field(
        None,
        ge=0,
        le=MAX_TIMESTAMP_S,
        allow_inf_nan=False,
        description="when it happened, seconds since the epoch (default: when received); at "
        f"most {MAX_CLOCK_SKEW_S // 3600} h ahead of the server's clock. A user's last items "
        "are the latest by this time, ties in the order received",
    )
    event_id: str | None = Field(None, min_length=1, max_length=128)


class InteractionsRequest(Body):
    events: list[InteractionIn] = Field(min_length=1, max_length=MAX_BATCH)


class InteractionsResponse(BaseModel):
    received: int
    applied: int


RequestId = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-f]{32}$"), Field(description="an answer's request_id")
]


class FeedbackRequest(Body):
    """What a user did with one answer: the items shown to them and those they chose. Each is
    counted once per answer and item, so the same feedback may be sent again."""

    request_id: RequestId
    impressions: list[Integer] = Field(
        default_factory=list,
        max_length=MAX_K,
        description="items of the answer shown to the user (clicked ones count as shown too)",
    )
    clicks: list[Integer] = Field(
        default_factory=list,
        max_length=MAX_K,
        description="items of the answer the user chose: each also an interaction of theirs, "
        "as POST /interactions records it (answers to a history sent in the body have no user)",
    )


class FeedbackResponse(BaseModel):
    request_id: str
    model_version: str = Field(description="of the model that gave the answer")
    arm: str | None = Field(description="the experiment arm that gave it; null: none ran")
    impressions: int = Field(description="impressions counted now (not counted before)")
    clicks: int = Field(description="clicks counted now (not counted before)")
    applied: int = Field(description="clicks newly applied to the user's profile")


class FeedbackTotals(BaseModel):
    model_version: str
    arm: str | None
    impressions: int
    clicks: int
    ctr: float | None = Field(description="clicks / impressions; null without impressions")
    ctr_95: tuple[float, float] | None = Field(
        description="95% (Wilson) interval of the click-through rate"
    )
    clicks_by_rank: dict[str, int] = Field(description="rank (1 = first item) -> clicks")


class ProfileItem(BaseModel):
    item_id: int
    attention: float
    components: list[list[float]] | None = Field(
        description="7x7 component attention, sums to 1; null when the served model reads no "
        "images (SASRec, served where it ranks better than ACF)"
    )


class ExplainRequest(HistoryBody):
    history: list[Integer] = Field(max_length=MAX_HISTORY, description="raw item ids, oldest first")
    item_id: Integer


class SharedTag(BaseModel):
    tag: str = Field(description="a genre, `word:<w>` of the title, or `decade:<d>s`")
    attention: float = Field(
        description="the item attention on the profile items that have this tag too (0-1)"
    )


class ExplainResponse(BaseModel):
    user_id: str | None
    item_id: int
    score: float
    profile: list[ProfileItem]
    tags: list[SharedTag] = Field(
        description="the item's tags the served model reads (genres, title words, decade), "
        "with how much of the profile's attention went to items that have them too, largest "
        "first; empty for a model without metadata"
    )
    model_version: str
    arm: str | None = Field(
        None, description="the experiment arm whose model explains (as /recommend answers)"
    )


class Ready(BaseModel):
    ready: bool
    process: int = Field(description="the id of the process that answered (one per worker)")
    model_version: str
    items: int
    index: str
    store: str = Field(
        description="the store's kind and health: ok, unreachable, or why it refuses writes"
    )
    degraded: bool = Field(
        False,
        description="the profile store does not answer (reads are served from cached profiles "
        "or popular items) or refuses writes (e.g. Redis out of memory); `store` says which. "
        "Writes are refused with 503 until it is back",
    )
    data_lost: str | None = Field(
        None,
        description="when the profile store was last found to have lost its data (Redis back "
        "empty) and whether profiles were reloaded; null if never, since this process started",
    )
    items_lost: str | None = Field(
        None,
        description="when the item store was last found to have lost added items, how many "
        "this process put back, and which ids hold another item now; null if never",
    )
    durable: bool | None = Field(
        None,
        description="whether an acknowledged write survives a crash of the store (Redis with "
        "appendonly yes and appendfsync always); null when unknown",
    )
    replication: str | None = Field(
        None,
        description="on a Redis Cluster, whether every primary has a replica to take over its "
        "slots, or durability is per node; null otherwise",
    )


# What a route may refuse with, for its ``responses=``: the schema then documents every status a
# client can get, so a fuzzer (tests/test_fuzz.py) can hold the service to it.
Responses = dict[int | str, dict[str, Any]]


class Problem(BaseModel):
    """Why a request was refused: the body of every refusal (``service.api.errors``), with the
    fields of its kind beside these two."""

    detail: str
    code: str = Field(
        description="what kind of refusal, stable across versions (e.g. unknown_items, "
        "event_conflict, store_unavailable, rate_limited): branch on it, not on the wording"
    )


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidFields(BaseModel):
    """FastAPI's own 422 body: the fields that failed validation, and why."""

    detail: list[FieldError]
    code: str = Field(description="invalid_fields")


class ConflictingEvents(Problem):
    """Event ids already applied with another item or timestamp (or repeated so within the
    request); nothing of the request was applied."""

    event_ids: list[str]


class FutureEvents(Problem):
    """Event timestamps too far ahead of the server's clock; nothing was applied."""

    timestamps: list[float]


class UnknownItems(Problem):
    """A well-formed request that names items the model does not know; none of it is applied."""

    unknown_item_ids: list[int]


class UnknownAttributes(Problem):
    """A filter naming attributes no item has; the known names are listed."""

    unknown_attributes: list[str]
    known_attributes: list[str]


# Every route with parameters: FastAPI documents its own 422 body unless told ours.
INVALID_FIELDS: Responses = {
    422: {"model": InvalidFields, "description": "a field is missing or invalid"}
}

UNKNOWN_ITEMS: Responses = {
    422: {
        "model": InvalidFields | UnknownItems,
        "description": "invalid fields, or item ids the model does not know",
    }
}

UNKNOWN_ATTRIBUTES: Responses = {
    422: {
        "model": InvalidFields | UnknownAttributes,
        "description": "invalid fields, or a filter naming attributes no item has",
    }
}
UNKNOWN_ITEMS_OR_ATTRIBUTES: Responses = {
    422: {
        "model": InvalidFields | UnknownItems | UnknownAttributes,
        "description": "invalid fields, item ids the model does not know, or a filter naming "
        "attributes no item has",
    }
}


class UnknownRequest(Problem):
    """No answer of that request_id within the feedback window: nothing was counted."""


class ItemsNotInAnswer(Problem):
    """Feedback about items the answer did not hold: nothing was counted."""

    items: list[int]


FEEDBACK_REFUSED: Responses = {
    404: {"model": UnknownRequest, "description": "no such answer within the feedback window"},
    422: {
        "model": InvalidFields | ItemsNotInAnswer,
        "description": "invalid fields, or items the answer did not hold; nothing was counted",
    },
}

# POST /interactions: what UNKNOWN_ITEMS says, and event times and ids it refuses.
EVENTS_REFUSED: Responses = {
    422: {
        "model": InvalidFields | UnknownItems | FutureEvents,
        "description": "invalid fields, item ids the model does not know, or timestamps more "
        "than a day ahead of the server's clock; nothing was applied",
    },
    409: {
        "model": ConflictingEvents,
        "description": "event ids already used for another item or timestamp; nothing was applied",
    },
}


def refusals(reasons: Mapping[int, str]) -> Responses:
    """Statuses answered with a ``Problem`` body, each with what it means."""
    return {status: {"model": Problem, "description": why} for status, why in reasons.items()}


# Routes that read a JSON body (``BodyLimit`` in ``service.api.security`` caps its size).
JSON_BODY = refusals(
    {
        400: "the body could not be read as JSON text (it is not UTF-8)",
        413: "the body is over the size limit",
        415: "the body was sent with a Content-Type other than application/json",
    }
)

# Routes behind ``service.api.security.guard``.
GUARDED = refusals(
    {
        401: "this call needs a valid API key in the X-API-Key header",
        429: "over the caller's rate limit: retry after Retry-After seconds",
    }
)


class StoreRefused(Problem):
    """The store (of profiles, or of added items) could not take the call now; retry after
    ``Retry-After`` seconds."""

    reason: str = Field(description="why, e.g. Redis out of memory, unreachable, or too slow")
    nothing_applied: bool = Field(
        description="true: certainly nothing was applied. false: the request reached the store "
        "and its answer was lost or late, so a batch may have been applied (whole, never in "
        "part); send it again with the same event_ids, each event is applied at most once"
    )


# Routes that need the profile store to answer (reads of /recommend do not: they degrade).
STORE_NEEDED: Responses = {
    503: {
        "model": StoreRefused,
        "description": "the profile store is unavailable: nothing was applied, or (when "
        "nothing_applied is false) the whole batch may have been; retry after Retry-After "
        "seconds with the same event_ids, each event is applied at most once",
    }
}


class ReloadRequest(BaseModel):
    checkpoint: str | None = Field(
        None, description="checkpoint file on the server; default: the serving one, read again"
    )
    features: str | None = Field(
        None, description="feature folder on the server; default: the serving one, read again"
    )


class ReloadResponse(BaseModel):
    previous_version: str
    model_version: str = Field(description="what every answer from now on names the model by")
    checkpoint: str
    features: str
    seconds: float = Field(description="to load the new model and try it")


class ReloadRefused(Problem):
    """The model was not replaced; ``model_version`` is the one still serving."""

    model_version: str
