"""Items added while serving, from their image (cold start): ``POST /items``.

The image goes through the checkpoint's own backbone and feature projection, the item gets
the model's tables and a vector from its image alone (no trained embedding), and a new engine
with it is swapped in, as a reload would: it is recommendable, explainable and on the page at
once. What is stored (:mod:`service.store.items`) is the image and its raw features, so every
replica picks the item up (:meth:`Items.sync`, run every ``items_sync_s`` by the app) and a
restart or a reloaded model rebuilds it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.api.forms import StrictForms
from service.api.reload import ModelSlot
from service.api.schemas import GUARDED, RETRY_AFTER_S, StoreRefused, refusals
from service.catalogue import Catalogue, CatalogueItem
from service.model.backbones import Backbone, component_features, load_backbone
from service.model.tags import item_tags
from service.recommender import Recommender
from service.store.items import AddedItem, ItemStore
from service.store.profiles import MAX_ITEM_ID, StoreUnavailable

log = logging.getLogger("visrec.items")
# MPO: a camera's JPEG holding several pictures (the first is read)
FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}
# Longest side over shortest: a 1 x 39M-pixel strip is within the pixel bound but took 6 s to
# decode and resize for a picture of nothing; posters and photos are within 1:4
MAX_ASPECT = 20
# A title is shown on the page: no control characters (C0, DEL, C1: also what invalid UTF-8
# often becomes, as the form parser falls back to Latin-1) and no bidirectional overrides,
# which can make a title read as something else (U+202E)
TITLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$"


class AddedItemResponse(BaseModel):
    item_id: int
    title: str
    genres: list[str]
    genres_read: list[str]  # those the serving model knows (none: it reads no metadata)
    title_read: list[str]  # the title's tags (words, decade) the serving model knows
    model_version: str
    items: int  # in the catalogue now
    seconds: float  # image to servable


@dataclass
class Items:
    """The added items this process knows, the store they live in, and how to make more."""

    store: ItemStore
    backbone_name: str
    device: torch.device
    max_image_bytes: int
    max_image_pixels: int
    known: dict[int, AddedItem] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one addition at a time
    on_loss: Callable[[int], object] = lambda n: None  # items found missing from the store
    lost: str | None = None  # what happened at the last loss, for /readyz
    _backbone: Backbone | None = None

    def backbone(self) -> Backbone:
        """The serving backbone, loaded on first use (a second or two, weights from disk)."""
        if self._backbone is None:
            self._backbone = load_backbone(self.backbone_name)
        return self._backbone

    def added_to(self, engine: Recommender) -> Recommender:
        """``engine`` with every known added item it does not have yet (a reload's engine).
        Runs on worker threads: ``known`` is replaced, never changed, so it reads one state."""
        known = self.known
        return _with(engine, [i for i in known.values() if not engine.knows(i.item_id)])

    async def sync(self, slot: ModelSlot, catalogue: Catalogue) -> int:
        """Pick up items other replicas (or an earlier run) added, and put back the ones this
        process knows that the store lost (Redis back empty); how many were new."""
        stored = set(await self.store.ids())
        await self._put_back([i for n, i in self.known.items() if n not in stored])
        fresh = sorted(stored - set(self.known))
        if not fresh:
            return 0
        items = await self.store.get(fresh)
        async with self.lock:
            self.known = {**self.known, **{i.item_id: i for i in items}}
            await slot.update(self.added_to)
        for item in items:
            catalogue.add(_catalogue_item(item))
        log.info("picked up %d added item(s): %s", len(items), [i.item_id for i in items])
        return len(items)

    async def _put_back(self, missing: list[AddedItem]) -> None:
        """Store again the items the store lost, from this process's copy: an id another
        item took meanwhile (added again after the loss) is reported, not overwritten."""
        if not missing:
            return
        taken = [i.item_id for i in missing if not await self.store.add(i)]
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.lost = (
            f"the item store lost {len(missing)} added item(s) at {when}; "
            f"{len(missing) - len(taken)} put back from this process's copy"
        )
        if taken:
            self.lost += (
                f"; {len(taken)} id(s) hold another item there now, added after the loss, "
                f"which this process does not serve: {', '.join(map(str, sorted(taken)))}"
            )
        self.on_loss(len(missing))
        log.error("%s", self.lost)


def _with(engine: Recommender, items: Iterable[AddedItem]) -> Recommender:
    items = list(items)
    if not items:
        return engine
    tags = [item_tags(i.title, i.genres) for i in items]
    # the (K, C) arrays as stored, never stacked: 10,000 of them are 1.25 GB to copy
    return engine.with_items([i.item_id for i in items], [i.features for i in items], tags)


def _catalogue_item(item: AddedItem) -> CatalogueItem:
    return CatalogueItem(
        item.item_id, item.title, None, item.image, item.media_type, genres=item.genres
    )


ADD_RESPONSES = {
    **GUARDED,
    **refusals(
        {
            400: "the body is not a readable multipart form, or a text field (title, genres) "
            "is not valid in the form's charset (UTF-8 unless its Content-Type names another)",
            409: "an item with this id exists, or the serving model cannot score items it was "
            "not trained on (or, scoring no images, knows none of its genres and title words); "
            "nothing was "
            "changed",
            413: "the image is over the size limits (bytes, pixels, or 20 times longer than "
            "wide); nothing was changed",
            415: "the file is not an image this service reads (JPEG, PNG, GIF, WebP); nothing "
            "was changed",
            503: "the item store is unavailable: `nothing_applied` says whether the item may "
            "have been stored all the same; send the same request again (the same image and "
            "title under the same id are taken again, 201)",
        }
    ),
}


def install_items(app: FastAPI, *, dependencies: list[Any]) -> None:
    """``dependencies``: the admin guard. The lifespan state must hold ``items`` (:class:`Items`),
    ``models`` and ``catalogue``."""
    router = APIRouter(route_class=StrictForms)  # a title is UTF-8 or refused, not re-read

    @router.post(
        "/items",
        status_code=201,
        response_model=AddedItemResponse,
        responses=ADD_RESPONSES,
        dependencies=dependencies,
    )
    async def add_item(
        request: Request,
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
    ) -> AddedItemResponse | JSONResponse:
        """Add an item from its image (multipart form: ``item_id``, ``image``, optional
        ``title`` and ``genres``; admin key). The serving backbone turns the image into the
        model's components, the item is scored from its image (and, by a model trained with
        metadata, its genres and title: ``genres_read`` and ``title_read`` say which it
        knows), and it is recommendable,
        explainable and on the page as soon as this answers 201; it is stored so that a
        restart, a reloaded model and every replica have it too. Sending the same image,
        title and genres under the same id again answers 201 too (a safe retry); another item
        under a taken id is 409. A title or genre with control characters or bidirectional
        overrides is 422."""
        started = time.perf_counter()
        items: Items = request.state.items
        slot: ModelSlot = request.state.models
        catalogue: Catalogue = request.state.catalogue
        data = await image.read(items.max_image_bytes + 1)
        if len(data) > items.max_image_bytes:
            raise HTTPException(413, f"the image is over {items.max_image_bytes} bytes")
        picture, media_type = await run_in_threadpool(decode_image, data, items.max_image_pixels)
        names = tuple(sorted({g.strip() for g in genres.split("|")} - {""}))
        refusal = slot.engine.refuses_new_item(item_tags(title, names))
        if refusal is not None:
            raise HTTPException(409, refusal)
        sent = AddedItem(item_id, title, media_type, data, np.empty(0, np.float16), names)
        async with items.lock:
            known = items.known.get(item_id)
            if known is not None and known.same_as(sent):  # a retry of an item it has
                return _added(known, slot, started)
            if known is not None or slot.engine.knows(item_id):
                raise HTTPException(409, f"item {item_id} is already in the catalogue")
            features = await run_in_threadpool(
                lambda: component_features(items.backbone(), [picture], device=items.device)[0]
            )
            added = replace(sent, features=features)
            try:
                stored = await items.store.add(added)  # True too for a retry it stored before
            except StoreUnavailable as err:
                return _unavailable(err)
            if not stored:  # another item took the id meanwhile (another replica's)
                raise HTTPException(409, f"item {item_id} is already in the catalogue")
            items.known = {**items.known, item_id: added}
            await slot.update(items.added_to)
        catalogue.add(_catalogue_item(added))
        log.info("item %d added from its image", item_id)
        return _added(added, slot, started)

    app.include_router(router)


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


def _unavailable(err: StoreUnavailable) -> JSONResponse:
    """503 saying whether the item may have been stored (then a retry of the same request is
    answered 201), as refused interactions do."""
    outcome = (
        "the call reached the store and its answer was lost or late, so the item may have been "
        "stored: send the same request again (the same image and title are accepted again)"
        if err.maybe_applied
        else "nothing was changed; retry later"
    )
    body = StoreRefused(
        detail=f"the item store is unavailable: {err.reason}; {outcome}",
        reason=err.reason,
        nothing_applied=not err.maybe_applied,
    )
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(status_code=503, content=body.model_dump(), headers=headers)


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The decoded image and its media type; 415 for what is not a readable image, 413 for one
    over ``max_pixels`` or :data:`MAX_ASPECT` (both checked from the header,
    before the pixels are decoded)."""
    try:
        picture = Image.open(io.BytesIO(data))
        if picture.format not in FORMATS:
            raise HTTPException(415, f"{picture.format} images are not accepted")
        width, height = picture.size
        if width * height > max_pixels:
            raise HTTPException(413, f"the image is {width}x{height}, over {max_pixels} pixels")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise HTTPException(
                413, f"the image is {width}x{height}, over {MAX_ASPECT} times longer than wide"
            )
        picture.load()
    except Image.DecompressionBombError as err:  # Pillow's own bound, met before ours
        raise HTTPException(413, f"the image is over {max_pixels} pixels") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise HTTPException(415, f"the file is not a readable image: {err}") from err
    return picture, FORMATS[picture.format or ""]
