"""The HTTP service: an app factory whose lifespan loads the model, index and profile store
(:mod:`service.api.lifespan`), with one router per resource (:mod:`service.api.routes`) and
one error body (:mod:`service.api.errors`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from service.api.errors import install_errors
from service.api.lifespan import serving
from service.api.metrics import Metrics, TimedRequests
from service.api.routes import (
    admin,
    explanations,
    feedback,
    interactions,
    items,
    operations,
    page,
    recommendations,
)
from service.api.security import Access, BodyLimit, Guards, Keys, Proxies, RateLimiter
from service.config import Settings, key_list
from service.engine import Preloaded


def create_app(
    settings: Settings,
    *,
    profiles: Mapping[str, Sequence[int]] | None = None,
    profile_times: Mapping[str, Sequence[float]] | None = None,
    preloaded: Preloaded | None = None,
) -> FastAPI:
    """``profiles``: histories (raw item ids, oldest first) for the store: the in-process one
    starts from them; into Redis they are merged once per data set (:mod:`service.store.epoch`);
    ``profile_times``: when each of their items came (seconds since the epoch; a user without:
    0, older than any live event).
    ``preloaded``: the model already loaded (by the process that forked this worker, so that
    the workers share its memory); by default the lifespan loads it: the registry's current
    version when there is a registry, else the configured files."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
        async with serving(
            settings, metrics, profiles=profiles, times=profile_times, preloaded=preloaded
        ) as state:
            yield state.as_lifespan_state()

    app = FastAPI(
        title="visrec",
        description="Visual recommendations with Attentive Collaborative Filtering: top-k items "
        "for a user or a history, their explanation, and the interactions that update profiles.",
        lifespan=lifespan,
        docs_url=None,  # served by the operations router, without a CDN
        redoc_url=None,  # ReDoc loads from a CDN too
    )
    app.add_middleware(TimedRequests, histogram=metrics.requests)
    # an image upload's form: the image and a few short fields
    upload = settings.max_image_bytes + 65_536
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, per_path={"/items": upload})
    install_errors(app)
    guards = Guards.of(_access(settings))
    for router in (
        recommendations.router(guards),
        interactions.router(guards),
        feedback.router(guards),
        explanations.router(guards),
        items.router(guards),
        admin.router(guards, roots=settings.reload_roots()),
        page.router(guards),
        operations.router(metrics),
    ):
        app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=page.STATIC), name="ui-static")
    app.mount(operations.DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs")
    return app


def _access(settings: Settings) -> Access:
    return Access(
        keys=Keys(key_list(settings.api_keys), key_list(settings.admin_keys), settings.auth_reads),
        limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_burst),
        failures=RateLimiter(settings.auth_failures_per_s, settings.auth_failure_burst),
        proxies=Proxies.parse(settings.trusted_proxies),
    )
