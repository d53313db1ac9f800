"""What operators and orchestrators call: liveness, readiness, metrics, and the API's docs.

``/docs`` is Swagger UI served from this process, not from a CDN (FastAPI's default page loads
its script and style from one: without internet, a blank page). The files come from the
``swagger-ui-bundle-v2`` package (Swagger UI 5, which reads OpenAPI 3.1); the app mounts them
under :data:`DOCS_ASSETS`.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from service.api.metrics import Metrics
from service.api.schemas import Ready
from service.api.state import StateDep

DOCS_ASSETS = "/docs/static"


def router(metrics: Metrics) -> APIRouter:
    routes = APIRouter()

    @routes.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (nothing else is checked)."""
        return {"status": "ok"}

    @routes.get("/readyz", response_model=Ready)
    async def readyz(state: StateDep) -> Ready:
        """200 once the model is loaded, also while the store is down (``degraded``): reads are
        still answered, and the store is shared, so failing every instance's check at once would
        turn a degraded service into none. Writes answer 503 on their own meanwhile."""
        store_ok = await state.store.ping()
        if store_ok and state.watch is not None:
            await state.watch.check()  # notices an empty Redis at once (also checked each second)
        refusal = await state.store.write_refusal() if store_ok else None
        health = refusal or ("ok" if store_ok else "unreachable")
        return Ready(
            ready=True,
            process=os.getpid(),
            degraded=not store_ok or refusal is not None,
            durable=await state.store.durable() if store_ok else None,
            replication=await state.store.replication() if store_ok else None,
            model_version=state.engine.version,
            items=len(state.engine.item_ids),
            index=state.engine.index.kind,
            store=f"{state.store_name}: {health}",
            data_lost=state.watch.lost if state.watch else None,
            items_lost=state.items.lost,
        )

    @routes.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return metrics.exposition()

    @routes.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        app = request.app
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    return routes
