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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from service.catalogue import Catalogue, CatalogueItem
from service.engine import ModelSlot
from service.errors import Refused
from service.model.backbones import Backbone, load_backbone, weights_identity
from service.model.projection import Projected, RawFeatures
from service.model.tags import item_tags
from service.recommender import Recommender
from service.store.items import AddedItem, ItemStore
from service.store.profiles import StoreUnavailable

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
# How long a model with another projection waits for added items' features still being read
FEATURES_WAIT_S = 60.0
FEATURES_PER_READ = 256  # items whose features the background reads at once (32 MB)
Rows = tuple[str | None, dict[int, np.ndarray]]  # by item, through the projection named first


def weights_refusal(backbone: str, weights_id: str, weights: Path | None) -> str | None:
    """Why this server cannot read a new image as the catalogue's images were read: the
    features name weights (``weights_id``) other than ``weights`` (None: the shipped file).
    None when they match, or when the features do not say (written before they did)."""
    if not weights_id:
        return None
    try:
        have = weights_identity(backbone, weights=weights)
    except OSError as err:
        have = f"unreadable ({err})"
    if have == weights_id:
        return None
    return (
        f"the catalogue's features were read with {backbone} weights {weights_id[:19]}..., "
        f"this server's are {have[:19]}... ({weights or 'the shipped file'}): a new image "
        "would not be read as theirs were. Set VISREC_BACKBONE_WEIGHTS to the weights file "
        "the features were extracted with"
    )


@dataclass
class Items:
    """The added items this process knows, the store they live in, and how to make more.

    A start (and a pick-up of other replicas' items) reads each item without its raw features
    and its rows through the serving model's projection, kept in the store by whoever
    projected them first; the raw features, which a model with another projection needs and
    a store that lost its data gets back (:meth:`_put_back`), follow in the background
    (:meth:`keep_features`)."""

    store: ItemStore
    backbone_name: str
    device: torch.device
    max_image_bytes: int
    max_image_pixels: int
    weights: Path | None = None  # the backbone's weights file (None: the shipped one)
    refusal: str | None = None  # why new images cannot be read as the catalogue's were
    known: dict[int, AddedItem] = field(default_factory=dict)  # features empty until read
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one addition at a time
    on_loss: Callable[[int], object] = lambda n: None  # items found missing from the store
    lost: str | None = None  # what happened at the last loss, for /readyz
    # rows of known items through one projection, by its key; replaced, never changed
    rows: Rows = (None, {})
    _unread: asyncio.Event = field(default_factory=asyncio.Event)  # known items lack features
    _backbone: Backbone | None = None

    def backbone(self) -> Backbone:
        """The serving backbone, loaded on first use (a second or two, weights from disk)."""
        if self._backbone is None:
            self._backbone = load_backbone(self.backbone_name, weights=self.weights)
        return self._backbone

    def added_to(self, engine: Recommender) -> Recommender:
        """``engine`` with every known added item it does not have yet (a reload's engine):
        from their projected rows when ``engine`` projects as they were, else from their raw
        features (waiting up to ``FEATURES_WAIT_S`` for those still being read). Runs on
        worker threads: ``known`` and ``rows`` are replaced, never changed, so it reads one
        state."""
        new = [i for i in self.known.values() if not engine.knows(i.item_id)]
        if not new:
            return engine
        key, rows = self.rows
        features: RawFeatures | Projected
        if key is not None and key == engine.projection_key and all(i.item_id in rows for i in new):
            features = Projected(key, torch.from_numpy(np.stack([rows[i.item_id] for i in new])))
        else:
            new = self._with_features(new)
            features = [i.features for i in new]  # as stored, never stacked: 1.25 GB at 10,000
        tags = [item_tags(i.title, i.genres) for i in new]
        return engine.with_items([i.item_id for i in new], features, tags)

    def _with_features(self, items: list[AddedItem]) -> list[AddedItem]:
        waited = time.monotonic() + FEATURES_WAIT_S
        while True:
            known = self.known
            whole = [known[i.item_id] for i in items]
            if all(i.features.size for i in whole):
                return whole
            if time.monotonic() > waited:
                raise RuntimeError(
                    f"the features of {sum(not i.features.size for i in whole)} added item(s) "
                    f"were not read from the item store within {FEATURES_WAIT_S:.0f} s"
                )
            time.sleep(0.05)

    async def admit(
        self, slot: ModelSlot, items: list[AddedItem], rows: Rows = (None, {})
    ) -> list[AddedItem]:
        """Serve those of ``items`` (stored already) it does not know yet, and return them:
        from their ``rows`` (or those it keeps) where they are through the serving model's
        projection, else from their raw features (read from the store if left out), projected
        here and then kept in the store for other processes and the next start. Call it
        holding :attr:`lock`."""
        items = [i for i in items if i.item_id not in self.known]
        if not items:
            return []
        engine = slot.engine
        key = engine.projection_key
        kept = {n: r for k, have in (self.rows, rows) if k == key for n, r in have.items()}
        unread = [i.item_id for i in items if i.item_id not in kept and not i.features.size]
        if unread:
            whole = {i.item_id: i for i in await self.store.get(unread)}
            items = [whole.get(i.item_id, i) for i in items]
        items = [i for i in items if i.features.size or i.item_id in kept]  # gone meanwhile
        todo = [i for i in items if i.item_id not in kept]
        if key is not None and todo:
            made = await asyncio.to_thread(engine.project, [i.features for i in todo])
            fresh = dict(zip([i.item_id for i in todo], made.rows.numpy(), strict=True))
            kept |= fresh
            try:
                await self.store.keep_rows(key, fresh)
            except StoreUnavailable as err:  # a cache: the next start projects them again
                log.warning("rows of %d added item(s) not kept: %s", len(fresh), err)
        self.rows = (key, kept)
        self.known = {**self.known, **{i.item_id: i for i in items}}
        if not all(i.features.size for i in items):
            self._unread.set()
        await slot.update(self.added_to)
        return items

    async def sync(self, slot: ModelSlot, catalogue: Catalogue) -> int:
        """Pick up items other replicas (or an earlier run) added, and put back the ones this
        process knows that the store lost (Redis back empty); how many were new."""
        stored = set(await self.store.ids())
        await self._put_back([i for n, i in self.known.items() if n not in stored])
        fresh = sorted(stored - set(self.known))
        if not fresh:
            return 0
        key = slot.engine.projection_key
        about = await self.store.about(fresh)
        kept = await self.store.rows(key, fresh) if key is not None else {}
        async with self.lock:
            items = await self.admit(slot, about, (key, kept))
        catalogue.add(*map(catalogue_item, items))
        log.info("picked up %d added item(s): %s", len(items), [i.item_id for i in items])
        return len(items)

    async def keep_features(self) -> None:
        """Read the raw features of known items that lack them, in the background, for as
        long as the app runs (retrying while the store is down)."""
        while True:
            await self._unread.wait()
            self._unread.clear()
            try:
                await self.read_features()
            except StoreUnavailable as err:
                log.warning("added items' features not read yet: %s", err)
                self._unread.set()
                await asyncio.sleep(1.0)

    async def read_features(self) -> None:
        """Read the raw features of the known items that lack them, ``FEATURES_PER_READ`` at
        a time (each kept as soon as read)."""
        unread = [n for n, i in self.known.items() if not i.features.size]
        for start in range(0, len(unread), FEATURES_PER_READ):
            read = await self.store.get(unread[start : start + FEATURES_PER_READ])
            self.known = {**self.known, **{i.item_id: i for i in read}}

    async def _put_back(self, missing: list[AddedItem]) -> None:
        """Store again the items the store lost, from this process's copy: an id another
        item took meanwhile (added again after the loss) is reported, not overwritten, and so
        is an item whose features this process had not read yet."""
        if not missing:
            return
        whole = [i for i in missing if i.features.size]
        taken = [i.item_id for i in whole if not await self.store.add(i)]
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.lost = (
            f"the item store lost {len(missing)} added item(s) at {when}; "
            f"{len(whole) - len(taken)} put back from this process's copy"
        )
        if taken:
            self.lost += (
                f"; {len(taken)} id(s) hold another item there now, added after the loss, "
                f"which this process does not serve: {', '.join(map(str, sorted(taken)))}"
            )
        if len(whole) < len(missing):
            self.lost += (
                f"; {len(missing) - len(whole)} could not be: this process had not read their "
                "features yet"
            )
        self.on_loss(len(missing))
        log.error("%s", self.lost)


def catalogue_item(item: AddedItem) -> CatalogueItem:
    return CatalogueItem(
        item.item_id,
        item.title,
        None,
        item.image,
        item.media_type,
        genres=item.genres,
        attributes=item.attributes,
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
