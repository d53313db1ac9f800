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
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api.forms import StrictForms
from service.api.items import catalogue_item, decode_image
from service.api.schemas import (
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    Body,
    StoreRefused,
    refusals,
)
from service.api.security import Guards
from service.api.state import CatalogueDep, StateDep
from service.catalogue import Catalogue, CatalogueItem
from service.engine import ModelSlot
from service.errors import NotFound, Refused
from service.model.backbones import component_features
from service.model.tags import item_tags
from service.store.items import AddedItem
from service.store.profiles import MAX_ITEM_ID, StoreUnavailable

log = logging.getLogger("visrec.items")
# A title is shown on the page: no control characters (C0, DEL, C1: also what invalid UTF-8
# often becomes, as the form parser falls back to Latin-1) and no bidirectional overrides,
# which can make a title read as something else (U+202E)
TITLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$"


class ItemInfo(BaseModel):
    item_id: int
    title: str
    image_url: str | None
    genres: list[str]
    added: bool = Field(
        description="added while serving (POST /items): scored from its image and genres, "
        "with no interactions behind it when the model was trained"
    )
    available: bool = Field(
        True, description="false: switched off (PATCH /items/{item_id}), never recommended"
    )


class ItemPatch(Body):
    """What to change of an item; a name not listed is refused (422)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    available: bool = Field(
        description="false switches the item off: no answer of any process contains it "
        "(within a quarter of a second on other workers and replicas) until it is switched on"
    )


class ItemAvailability(BaseModel):
    item_id: int
    available: bool


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
    genres_read: list[str]  # those the serving model knows (none: it reads no metadata)
    title_read: list[str]  # the title's tags (words, decade) the serving model knows
    model_version: str
    items: int  # in the catalogue now
    seconds: float  # image to servable


ADD_RESPONSES = {
    **GUARDED,
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
        response_model=ItemAvailability,
        responses=PATCH_RESPONSES,
        dependencies=guards.admin,
    )(patch_item)
    return routes


async def patch_item(
    item_id: Annotated[int, Path(ge=0, le=MAX_ITEM_ID)], body: ItemPatch, state: StateDep
) -> ItemAvailability:
    """Switch an item off (``available: false``) or on again (admin key). Off, it is in no
    answer of ``/recommend`` on any process, with or without filters, until switched on; the
    switch is kept with the added items (Redis when configured), so it outlives restarts and
    model reloads."""
    if not state.engine.knows(item_id):
        raise NotFound(f"no item {item_id} in the serving model")
    try:
        await state.availability.switch(item_id, available=body.available)
    except StoreUnavailable as err:
        raise err.of("item") from err
    log.info("item %d switched %s", item_id, "on" if body.available else "off")
    return ItemAvailability(item_id=item_id, available=body.available)


async def item_info(item_id: int, catalogue: CatalogueDep, request: Request) -> ItemInfo:
    """An item's title, genres and the URL of its image, from the dataset's items.csv or, for
    an item added while serving (``added``), from POST /items."""
    item = _item(catalogue, item_id)
    url = f"/items/{item_id}/image" if item.has_image else None
    return ItemInfo(
        item_id=item_id,
        title=item.title,
        image_url=url,
        genres=list(item.genres),
        added=item.data is not None,
        available=item_id not in _switched_off(request),
    )


def _switched_off(request: Request) -> frozenset[int]:
    """The items switched off, for an app with a serving state (an app serving only item
    pages has none)."""
    state = getattr(request.state, "app_state", None)
    return state.availability.off if state is not None else frozenset()


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
    genres: Annotated[
        str,
        Form(
            max_length=1000,
            pattern=TITLE_PATTERN,
            description="|-separated, as in items.csv (e.g. Animation|Children's)",
        ),
    ] = "",
) -> AddedItemResponse:
    """Add an item from its image (multipart form: ``item_id``, ``image``, optional
    ``title`` and ``genres``; admin key). The serving backbone turns the image into the
    model's components, the item is scored from its image (and, by a model trained with
    metadata, its genres and title: ``genres_read`` and ``title_read`` say which it
    knows), and it is recommendable, explainable and on the page as soon as this answers
    201; it is stored so that a restart, a reloaded model and every replica have it too.
    Sending the same image, title and genres under the same id again answers 201 too (a
    safe retry); another item under a taken id is 409. A title or genre with control
    characters or bidirectional overrides is 422."""
    started = time.perf_counter()
    items, slot = state.items, state.models
    data = await image.read(items.max_image_bytes + 1)
    if len(data) > items.max_image_bytes:
        raise Refused(413, "image_too_large", f"the image is over {items.max_image_bytes} bytes")
    picture, media_type = await run_in_threadpool(decode_image, data, items.max_image_pixels)
    names = tuple(sorted({g.strip() for g in genres.split("|")} - {""}))
    refusal = slot.engine.refuses_new_item(item_tags(title, names))
    if refusal is not None:
        raise Refused(409, "new_items_refused", refusal)
    sent = AddedItem(item_id, title, media_type, data, np.empty(0, np.float16), names)
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
        genres_read=[g for g in item.genres if g in slot.engine.tags],
        title_read=sorted(set(item_tags(item.title, ())) & set(slot.engine.tags)),
        model_version=slot.engine.version,
        items=len(slot.engine.item_ids),
        seconds=round(time.perf_counter() - started, 3),
    )
