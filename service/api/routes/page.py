"""The explanation page and the experiments page (``GET /feedback`` as a table): static HTML
with a little plain JavaScript that reads the JSON API (``/recommend``, ``/explain``,
``/interactions``, ``/items``, ``/feedback``), so it shows exactly what API clients get and
needs no build step. Images come from the catalogue only: a request names an item id, never a
path.

The pages hold no data; a browser cannot send a key when it opens one, so they are only
rate-limited, and a page asks for a key (kept in the tab's session storage) and sends it with
every call it makes. Item titles and images are reads like any other (``routes/items.py``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.security import Guards

STATIC = Path(__file__).parent.parent / "static"  # mounted by the app under /ui/static


def router(guards: Guards) -> APIRouter:
    routes = APIRouter(dependencies=guards.page)

    @routes.get("/ui/users/{user_id}", include_in_schema=False)
    async def user_page(user_id: str) -> FileResponse:
        """The page reads the user id (and ``?item_id=``, the item to explain) from its URL."""
        return FileResponse(STATIC / "user.html", media_type="text/html")

    @routes.get("/ui/experiments", include_in_schema=False)
    async def experiments_page() -> FileResponse:
        """Impressions, clicks and CTR per model version and arm (``GET /feedback``)."""
        return FileResponse(STATIC / "experiments.html", media_type="text/html")

    return routes
