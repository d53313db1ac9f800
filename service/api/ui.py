"""The explanation page and the item titles and images it shows.

The page is static HTML with a little plain JavaScript that reads the JSON API (``/recommend``,
``/explain``, ``/interactions``), so it shows exactly what API clients get and needs no build
step. Images come from the catalogue only: a request names an item id, never a path.

Item titles and images are reads like any other: behind the read guard (a key with
``VISREC_AUTH_READS``, and the rate limit). The page itself holds no data; a browser cannot send
a key when it opens it, so it is only rate-limited, and the page asks for a key (kept in the
tab's session storage) and sends it with every call it makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from service.api.schemas import GUARDED, refusals
from service.catalogue import Catalogue, CatalogueItem

STATIC = Path(__file__).parent / "static"


class ItemInfo(BaseModel):
    item_id: int
    title: str
    image_url: str | None
    genres: list[str]
    added: bool = Field(
        description="added while serving (POST /items): scored from its image and genres, "
        "with no interactions behind it when the model was trained"
    )


async def _catalogue(request: Request) -> Catalogue:
    catalogue: Catalogue = request.state.catalogue
    return catalogue


CatalogueDep = Annotated[Catalogue, Depends(_catalogue)]


def _item(catalogue: Catalogue, item_id: int) -> CatalogueItem:
    item = catalogue.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail=f"no item {item_id} in the catalogue")
    return item


def _router(page: Sequence[Any], read: Sequence[Any]) -> APIRouter:
    router = APIRouter()

    @router.get("/ui/users/{user_id}", include_in_schema=False, dependencies=list(page))
    async def user_page(user_id: str) -> FileResponse:
        """The page reads the user id (and ``?item_id=``, the item to explain) from its URL."""
        return FileResponse(STATIC / "user.html", media_type="text/html")

    @router.get(
        "/items/{item_id}",
        response_model=ItemInfo,
        dependencies=list(read),
        responses=GUARDED | refusals({404: "no such item"}),
        description="An item's title, genres and the URL of its image, from the dataset's "
        "items.csv or, for an item added while serving (``added``), from POST /items.",
    )
    async def item_info(item_id: int, catalogue: CatalogueDep) -> ItemInfo:
        item = _item(catalogue, item_id)
        url = f"/items/{item_id}/image" if item.has_image else None
        return ItemInfo(
            item_id=item_id,
            title=item.title,
            image_url=url,
            genres=list(item.genres),
            added=item.data is not None,
        )

    @router.get(
        "/items/{item_id}/image",
        response_class=FileResponse,
        dependencies=list(read),
        responses=GUARDED | refusals({404: "no such item, or it has no image"}),
        description="An item's image: a file from the dataset folder (never a path outside it), "
        "or the image an item was added with (POST /items).",
    )
    async def item_image(item_id: int, catalogue: CatalogueDep) -> Response:
        item = _item(catalogue, item_id)
        if item.data is not None:  # added while serving
            return Response(item.data, media_type=item.media_type)
        if item.image is None:
            raise HTTPException(status_code=404, detail=f"item {item_id} has no image")
        return FileResponse(item.image, media_type=item.media_type)

    return router


def install_ui(app: FastAPI, *, page: Sequence[Any], read: Sequence[Any]) -> None:
    """Add the page's routes, ``page`` guarding the page itself and ``read`` the item routes;
    the lifespan state must hold ``catalogue`` (empty: no images)."""
    app.include_router(_router(page, read))
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
