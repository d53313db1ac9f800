"""``/items``: an item's title, genres and image, and ``POST /items``, which adds an item from
its image while serving (see :mod:`service.api.items`)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Path, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from service.api.forms import StrictForms
from service.api.items import catalogue_item, decode_image
from service.api.schemas import (
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    MAX_ATTRIBUTES,
    MAX_FILTER_VALUES,
    UNSAFE,
    AttributeName,
    Body,
    Condition,
    GenreName,
    InvalidFields,
    Problem,
    StoreRefused,
    Year,
    conditions,
    refusals,
)
from service.api.security import Guards
from service.api.state import CatalogueDep, StateDep
from service.catalogue import Catalogue, CatalogueItem
from service.engine import ModelSlot
from service.errors import NotFound, Refused
from service.filters import GENRES, YEAR_NAME, Row
from service.model.backbones import component_features
from service.model.tags import item_tags
from service.store.items import AddedItem
from service.store.profiles import MAX_ITEM_ID, StoreUnavailable

log = logging.getLogger("visrec.items")
# A title is shown on the page: none of the UNSAFE characters
TITLE_PATTERN = rf"^[^{UNSAFE}]*$"


class ItemAttributes(BaseModel):
    """What filters read of an item: its own attributes with PATCH's changes."""

    item_id: int
    available: bool = Field(
        True, description="false: switched off (PATCH /items/{item_id}), never recommended"
    )
    genres: list[str]
    year: int | None = Field(description="the title's year, or PATCH's; none: no year")
    attributes: dict[str, list[str]] = Field(
        description="its other attributes (items.csv's other columns, POST /items's, PATCH's)"
    )


class ItemInfo(ItemAttributes):
    title: str
    image_url: str | None
    added: bool = Field(
        description="added while serving (POST /items): scored from its image and genres, "
        "with no interactions behind it when the model was trained"
    )


Values = Annotated[list[GenreName], Field(max_length=MAX_FILTER_VALUES)]


class ItemPatch(Body):
    """What to change of an item (at least one field); a name not listed is refused (422).
    Attributes changed here are what filters read, on every process within a quarter of a
    second; how the model scores the item stays what it was trained or added with."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"minProperties": 1})
    available: bool | None = Field(
        None,
        description="false switches the item off: no answer of any process contains it "
        "(within a quarter of a second on other workers and replicas) until it is switched on",
    )
    genres: Values | None = Field(
        None, description="its genres from now on ([]: none); null: back to its own"
    )
    year: Year | None = Field(None, description="its year from now on; null: back to its own")
    attributes: dict[AttributeName, Values | None] = Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        description="for each attribute named, its values from now on ([]: none); null: back "
        'to its own, e.g. {"colour": ["red"], "on_sale": null} (genres and year are fields of '
        "their own)",
        json_schema_extra={  # AttributeName's bounds, and neither of those two
            "propertyNames": {
                "minLength": 1,
                "maxLength": 100,
                "not": {"enum": [GENRES, YEAR_NAME]},
            }
        },
    )

    @model_validator(mode="after")
    def _says_what_to_change(self) -> ItemPatch:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give available, genres, year or attributes")
        if {GENRES, YEAR_NAME} & self.attributes.keys():
            raise ValueError("genres and year are fields of their own, not attributes")
        return self

    def changes(self) -> dict[str, tuple[str, ...] | int | None]:
        """The attributes it sets (None: back to the item's own)."""
        out: dict[str, tuple[str, ...] | int | None] = {
            n: None if v is None else tuple(sorted(set(v))) for n, v in self.attributes.items()
        }
        if GENRES in self.model_fields_set:
            out[GENRES] = None if self.genres is None else tuple(sorted(set(self.genres)))
        if YEAR_NAME in self.model_fields_set:
            out[YEAR_NAME] = self.year
        return out


PATCH_RESPONSES = {
    **GUARDED,
    **JSON_BODY,
    **refusals({404: "no such item in the serving model"}),
    503: {
        "model": StoreRefused,
        "description": "the store of switches is unavailable: `nothing_applied` says whether "
        "the change may have been made all the same; send it again (it is idempotent)",
    },
}


class AddedItemResponse(BaseModel):
    item_id: int
    title: str
    genres: list[str]
    attributes: dict[str, list[str]]
    genres_read: list[str]  # those the serving model knows (none: it reads no metadata)
    title_read: list[str]  # the title's tags (words, decade) the serving model knows
    model_version: str
    items: int  # in the catalogue now
    seconds: float  # image to servable


ADD_RESPONSES = {
    **GUARDED,
    422: {
        "model": InvalidFields | Problem,
        "description": "a field is missing or invalid, or an attribute is named genres, year "
        "or title (fields of their own)",
    },
    **refusals(
        {
            400: "the body is not a readable multipart form, or a text field (title, genres) "
            "is not valid in the form's charset (UTF-8 unless its Content-Type names another)",
            409: "an item with this id exists, or the serving model cannot score items it was "
            "not trained on (or, scoring no images, knows none of its genres and title words); "
            "nothing was changed",
            413: "the image is over the size limits (bytes, pixels, or 20 times longer than "
            "wide); nothing was changed",
            415: "the file is not an image this service reads (JPEG, PNG, GIF, WebP); nothing "
            "was changed",
        }
    ),
    503: {
        "model": StoreRefused,
        "description": "the item store is unavailable: `nothing_applied` says whether the item "
        "may have been stored all the same; send the same request again (the same image and "
        "title under the same id are taken again, 201)",
    },
}


GenresField = Annotated[
    str,
    Form(
        max_length=1000,
        pattern=TITLE_PATTERN,
        description="|-separated, as in items.csv (e.g. Animation|Children's)",
    ),
]
AttributeFields = Annotated[
    list[Condition],
    Form(
        max_length=MAX_ATTRIBUTES,
        description="another attribute for filters, name:value,value (repeatable), e.g. "
        "attribute=colour:red,blue and attribute=brand:Acme; not genres, year or title, "
        "which are its own",
    ),
]


def router(guards: Guards) -> APIRouter:
    # a title is UTF-8 or refused, not re-read
    routes = APIRouter(route_class=StrictForms, responses=INVALID_FIELDS)
    routes.get(
        "/items/{item_id}",
        response_model=ItemInfo,
        dependencies=guards.read,
        responses=GUARDED | refusals({404: "no such item"}),
    )(item_info)
    routes.get(
        "/items/{item_id}/image",
        response_class=FileResponse,
        dependencies=guards.read,
        responses=GUARDED | refusals({404: "no such item, or it has no image"}),
    )(item_image)
    routes.post(
        "/items",
        status_code=201,
        response_model=AddedItemResponse,
        responses=ADD_RESPONSES,
        dependencies=guards.admin,
    )(add_item)
    routes.patch(
        "/items/{item_id}",
        response_model=ItemAttributes,
        responses=PATCH_RESPONSES,
        dependencies=guards.admin,
    )(patch_item)
    return routes


async def patch_item(
    item_id: Annotated[int, Path(ge=0, le=MAX_ITEM_ID)], body: ItemPatch, state: StateDep
) -> ItemAttributes:
    """Switch an item off (``available: false``) or on again, and change the attributes
    filters read of it (admin key). Off, it is in no answer of ``/recommend`` on any process,
    with or without filters, until switched on; changed attributes are what every process's
    filters read. Both are kept with the added items (Redis when configured), so they outlive
    restarts and model reloads. The answer is the item as filters now see it."""
    if not state.engine.knows(item_id):
        raise NotFound(f"no item {item_id} in the serving model")
    changes = body.changes()
    try:
        if changes:
            await state.patches.change(item_id, changes)
        if body.available is not None:
            await state.patches.switch(item_id, available=body.available)
    except StoreUnavailable as err:
        raise err.of("item") from err
    log.info("item %d changed: %s", item_id, body.model_dump(exclude_unset=True))
    row = state.catalogue.attributes(state.patches.changes).row(item_id)
    return _attributes(item_id, row, item_id not in state.patches.off)


async def item_info(item_id: int, catalogue: CatalogueDep, request: Request) -> ItemInfo:
    """An item's title, image URL and attributes, from the dataset's items.csv or, for an
    item added while serving (``added``), from POST /items, with PATCH's changes."""
    item = _item(catalogue, item_id)
    state = getattr(request.state, "app_state", None)  # none: an app serving only item pages
    changes, off = (state.patches.changes, state.patches.off) if state else ({}, frozenset())
    about = _attributes(item_id, catalogue.attributes(changes).row(item_id), item_id not in off)
    return ItemInfo(
        **about.model_dump(),
        title=item.title,
        image_url=f"/items/{item_id}/image" if item.has_image else None,
        added=item.data is not None,
    )


def _attributes(item_id: int, row: Row | None, available: bool) -> ItemAttributes:
    values = row.values if row is not None else {}
    return ItemAttributes(
        item_id=item_id,
        available=available,
        genres=sorted(values.get(GENRES, ())),
        year=row.year if row is not None else None,
        attributes={n: sorted(v) for n, v in sorted(values.items()) if n != GENRES},
    )


async def item_image(item_id: int, catalogue: CatalogueDep) -> Response:
    """An item's image: a file from the dataset folder (never a path outside it), or the image
    an item was added with (POST /items)."""
    item = _item(catalogue, item_id)
    if item.data is not None:  # added while serving
        return Response(item.data, media_type=item.media_type)
    if item.image is None:
        raise NotFound(f"item {item_id} has no image", code="no_image")
    return FileResponse(item.image, media_type=item.media_type)


async def add_item(
    state: StateDep,
    item_id: Annotated[int, Form(ge=0, le=MAX_ITEM_ID)],
    image: Annotated[UploadFile, File(description="the item's image: JPEG, PNG, GIF or WebP")],
    title: Annotated[str, Form(max_length=1000, pattern=TITLE_PATTERN)] = "",
    genres: GenresField = "",
    attribute: AttributeFields = [],  # noqa: B006 (FastAPI copies it)
) -> AddedItemResponse:
    """Add an item from its image (multipart form: ``item_id``, ``image``, optional
    ``title``, ``genres`` and ``attribute`` fields; admin key). The serving backbone turns the
    image into the model's components, the item is scored from its image (and, by a model
    trained with metadata, its genres and title: ``genres_read`` and ``title_read`` say which
    it knows), and it is recommendable, explainable, on the page and filterable by its
    attributes as soon as this answers 201; it is stored so that a restart, a reloaded model
    and every replica have it too. Sending the same image, title, genres and attributes under
    the same id again answers 201 too (a safe retry); another item under a taken id is 409.
    A title, genre or attribute with control characters or bidirectional overrides is 422."""
    started = time.perf_counter()
    items, slot = state.items, state.models
    data = await image.read(items.max_image_bytes + 1)
    if len(data) > items.max_image_bytes:
        raise Refused(413, "image_too_large", f"the image is over {items.max_image_bytes} bytes")
    picture, media_type = await run_in_threadpool(decode_image, data, items.max_image_pixels)
    names = tuple(sorted({g.strip() for g in genres.split("|")} - {""}))
    others = _attributes_sent(attribute)
    refusal = items.refusal or slot.engine.refuses_new_item(item_tags(title, names))
    if refusal is not None:
        raise Refused(409, "new_items_refused", refusal)
    sent = AddedItem(item_id, title, media_type, data, np.empty(0, np.float16), names, others)
    async with items.lock:
        known = items.known.get(item_id)
        if known is not None and known.same_as(sent):  # a retry of an item it has
            return _added(known, slot, started)
        if known is not None or slot.engine.knows(item_id):
            raise _taken(item_id)
        features = await run_in_threadpool(
            lambda: component_features(items.backbone(), [picture], device=items.device)[0]
        )
        added = replace(sent, features=features)
        try:
            stored = await items.store.add(added)  # True too for a retry it stored before
        except StoreUnavailable as err:  # it may say so of any store: it is the items'
            raise err.of("item") from err
        if not stored:  # another item took the id meanwhile (another replica's)
            raise _taken(item_id)
        await items.admit(slot, [added])
    state.catalogue.add(catalogue_item(added))
    log.info("item %d added from its image", item_id)
    return _added(added, slot, started)


def _attributes_sent(given: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """POST /items's ``attribute`` fields as (name, sorted values), by name; 422 for one
    naming genres, year or title."""
    read = conditions(given)
    reserved = sorted({GENRES, YEAR_NAME, "title"} & read.keys())
    if reserved:
        raise Refused(
            422, "reserved_attribute", f"{', '.join(reserved)}: fields of their own, not attributes"
        )
    return tuple(sorted((name, tuple(sorted(set(values)))) for name, values in read.items()))


def _item(catalogue: Catalogue, item_id: int) -> CatalogueItem:
    item = catalogue.get(item_id)
    if item is None:
        raise NotFound(f"no item {item_id} in the catalogue")
    return item


def _taken(item_id: int) -> Refused:
    return Refused(409, "item_exists", f"item {item_id} is already in the catalogue")


def _added(item: AddedItem, slot: ModelSlot, started: float) -> AddedItemResponse:
    return AddedItemResponse(
        item_id=item.item_id,
        title=item.title,
        genres=list(item.genres),
        attributes={n: list(v) for n, v in item.attributes},
        genres_read=[g for g in item.genres if g in slot.engine.tags],
        title_read=sorted(set(item_tags(item.title, ())) & set(slot.engine.tags)),
        model_version=slot.engine.version,
        items=len(slot.engine.item_ids),
        seconds=round(time.perf_counter() - started, 3),
    )
