"""Items added while serving, from their image (cold start; the route is ``POST /items`` in
:mod:`service.api.routes.items`).

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
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

from service.catalogue import Catalogue, CatalogueItem
from service.engine import ModelSlot
from service.errors import Refused
from service.model.backbones import Backbone, load_backbone
from service.model.tags import item_tags
from service.recommender import Recommender
from service.store.items import AddedItem, ItemStore

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
        catalogue.add(*map(catalogue_item, items))
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


def catalogue_item(item: AddedItem) -> CatalogueItem:
    return CatalogueItem(
        item.item_id, item.title, None, item.image, item.media_type, genres=item.genres
    )


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The decoded image and its media type; 415 for what is not a readable image, 413 for one
    over ``max_pixels`` or :data:`MAX_ASPECT` (both checked from the header,
    before the pixels are decoded)."""
    try:
        picture = Image.open(io.BytesIO(data))
        if picture.format not in FORMATS:
            raise Refused(415, "unsupported_image", f"{picture.format} images are not accepted")
        width, height = picture.size
        if width * height > max_pixels:
            raise Refused(
                413, "image_too_large", f"the image is {width}x{height}, over {max_pixels} pixels"
            )
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise Refused(
                413,
                "image_too_large",
                f"the image is {width}x{height}, over {MAX_ASPECT} times longer than wide",
            )
        picture.load()
    except Image.DecompressionBombError as err:  # Pillow's own bound, met before ours
        raise Refused(413, "image_too_large", f"the image is over {max_pixels} pixels") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise Refused(415, "unsupported_image", f"the file is not a readable image: {err}") from err
    return picture, FORMATS[picture.format or ""]
