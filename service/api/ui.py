"""The explanation page and the item titles and images it shows.

The page is static HTML with a little plain JavaScript that reads the JSON API (``/recommend``,
``/explain``, ``/interactions``), so it shows exactly what API clients get and needs no build
step. Images come from the catalogue only: a request names an item id, never a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from service.api.schemas import refusals
from service.catalogue import Catalogue, CatalogueItem

STATIC = Path(__file__).parent / "static"
router = APIRouter()


class ItemInfo(BaseModel):
    item_id: int
    title: str
    image_url: str | None


async def _catalogue(request: Request) -> Catalogue:
    catalogue: Catalogue = request.state.catalogue
    return catalogue


CatalogueDep = Annotated[Catalogue, Depends(_catalogue)]


def _item(catalogue: Catalogue, item_id: int) -> CatalogueItem:
    item = catalogue.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail=f"no item {item_id} in the catalogue")
    return item


@router.get("/ui/users/{user_id}", include_in_schema=False)
async def user_page(user_id: str) -> FileResponse:
    """The page reads the user id (and ``?item_id=``, the item to explain) from its own URL."""
    return FileResponse(STATIC / "user.html", media_type="text/html")


@router.get("/items/{item_id}", response_model=ItemInfo, responses=refusals({404: "no such item"}))
async def item_info(item_id: int, catalogue: CatalogueDep) -> ItemInfo:
    item = _item(catalogue, item_id)
    url = f"/items/{item_id}/image" if item.has_image else None
    return ItemInfo(item_id=item_id, title=item.title, image_url=url)


@router.get(
    "/items/{item_id}/image",
    response_class=FileResponse,
    responses=refusals({404: "no such item, or it has no image"}),
)
async def item_image(item_id: int, catalogue: CatalogueDep) -> Response:
    item = _item(catalogue, item_id)
    if item.data is not None:  # added while serving
        return Response(item.data, media_type=item.media_type)
    if item.image is None:
        raise HTTPException(status_code=404, detail=f"item {item_id} has no image")
    return FileResponse(item.image, media_type=item.media_type)


def install_ui(app: FastAPI) -> None:
    """Add the page's routes; the lifespan state must hold ``catalogue`` (empty: no images)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
