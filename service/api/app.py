"""The HTTP service: an app factory whose lifespan loads the model, index and profile store."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.admin import install_admin
from service.api.batcher import MicroBatcher
from service.api.docs import install_docs
from service.api.items import Items, install_items
from service.api.metrics import Metrics
from service.api.reload import ModelSlot, ReloadBusy, reload_on_hangup
from service.api.schemas import (
    EVENTS_REFUSED,
    GUARDED,
    JSON_BODY,
    MAX_CLOCK_SKEW_S,
    MAX_K,
    RETRY_AFTER_S,
    STORE_NEEDED,
    UNKNOWN_ITEMS,
    ConflictingEvents,
    ExplainRequest,
    ExplainResponse,
    FutureEvents,
    HistoryRequest,
    InteractionsRequest,
    InteractionsResponse,
    ProfileItem,
    Ready,
    RecommendResponse,
    ScoredItem,
    SharedTag,
    StoreRefused,
    UserIdInPath,
)
from service.api.security import (
    Access,
    BodyLimit,
    Keys,
    Proxies,
    RateLimiter,
    Role,
    guard,
    rate_limited,
)
from service.api.ui import install_ui
from service.catalogue import Catalogue, load_catalogue
from service.config import Settings, key_list
from service.engine import Preloaded, Source, load_engine, registry_of, start_source
from service.model.feature_store import load_features
from service.recommender import (
    Query as RecQuery,
)
from service.recommender import (
    Recommendation,
    Recommender,
    UnknownItemsError,
)
from service.registry import Current, Registry, follow
from service.runtime import pick_device, torch_threads
from service.store.epoch import EpochWatch
from service.store.items import DirectoryItemStore, ItemStore, MemoryItemStore, RedisItemStore
from service.store.journal import Journal
from service.store.memory import MemoryProfileStore
from service.store.profiles import EventConflict, Interaction, ProfileStore, StoreUnavailable
from service.store.redis_profiles import RedisProfileStore
from service.store.resilient import ResilientStore

log = logging.getLogger("visrec.api")
EPOCH_CHECK_S = 1.0  # how often a process looks whether Redis came back empty


@dataclass
class State:
    models: ModelSlot  # the serving engine, which POST /admin/reload and SIGHUP replace
    store: ResilientStore
    store_name: str
    batcher: MicroBatcher[RecQuery, Recommendation]
    watch: EpochWatch | None  # whether Redis lost its data; None for the in-process store
    items: Items  # added items

    @property
    def engine(self) -> Recommender:
        """The engine serving now: a request that needs it twice reads it once (a swap may
        come in between)."""
        return self.models.engine


def _load(
    settings: Settings,
    finish: Callable[[Recommender], Recommender],
    source: Source,
    engine: Recommender | None = None,
) -> ModelSlot:
    """The slot serving ``source``, with every engine it loads (at start, on reload) passed
    through ``finish`` (which adds the items added while serving); ``engine``: the start one,
    already loaded.
    One query runs before the slot is returned, so the first request does not pay for lazy
    initialisation."""
    device = pick_device(settings.device)
    if device.type == "cpu":
        # A request's model work is a few small ops: extra intra-op threads only add hand-off
        # latency, and the web server needs the other cores.
        torch.set_num_threads(settings.cpu_threads)
    build = partial(load_engine, device=device, index=settings.index)

    def load(source: Source) -> Recommender:
        return finish(build(source))

    slot = ModelSlot(load(source) if engine is None else finish(engine), source, load)
    slot.warm_up()
    return slot


def _items(settings: Settings) -> Items:
    """Where added items live: Redis when the profiles do, else a folder, else this process."""
    store: ItemStore
    if settings.redis_url:
        store = RedisItemStore.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            deadline_s=settings.redis_write_timeout_ms / 1000,
        )
    elif settings.items_dir is not None:
        store = DirectoryItemStore(settings.items_dir)
    else:
        store = MemoryItemStore()
    _, meta = load_features(settings.features)
    return Items(
        store,
        backbone_name=meta.backbone,
        device=pick_device(settings.device),
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


async def _sync_items(items: Items, slot: ModelSlot, catalogue: Catalogue, every_s: float) -> None:
    """Pick up items added by other replicas, for as long as the app runs."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await items.sync(slot, catalogue)
        except StoreUnavailable as err:
            log.warning("added items not synchronised this time: %s", err)


async def _follow_registry(
    registry: Registry, slot: ModelSlot, serving: Current | None, poll_s: float
) -> None:
    """Serve the registry's current version, through every publish and rollback."""

    async def load(checkpoint: Path, features: Path) -> None:
        while True:
            try:
                await slot.reload(checkpoint, features)
                return
            except ReloadBusy:  # an admin reload is running: ours comes after it
                await asyncio.sleep(0.5)

    await follow(registry, load, serving=serving, poll_s=poll_s)


def create_app(
    settings: Settings,
    *,
    profiles: Mapping[str, Sequence[int]] | None = None,
    preloaded: Preloaded | None = None,
) -> FastAPI:
    """``profiles``: histories (raw item ids, oldest first) for the store: the in-process one
    starts from them; into Redis they are merged once per data set (:mod:`service.store.epoch`).
    ``preloaded``: the model already loaded (by the process that forked this worker, so that
    the workers share its memory); by default the lifespan loads it: the registry's current
    version when there is a registry, else the configured files."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        items = await run_in_threadpool(_items, settings)
        items.on_loss = metrics.items_lost.inc
        if preloaded is None:
            source, serving = await run_in_threadpool(start_source, settings)
            engine = None
        else:
            source, serving, engine = preloaded.source, preloaded.serving, preloaded.engine
        models = await run_in_threadpool(_load, settings, items.added_to, source, engine)
        metrics.model_version = lambda: models.engine.version
        catalogue = await run_in_threadpool(load_catalogue, settings.data)  # titles, images
        try:  # added by an earlier run or another replica; every core, as nothing else runs
            with torch_threads(os.cpu_count() or 1):
                await items.sync(models, catalogue)
        except StoreUnavailable as err:  # the periodic sync picks them up once it answers
            log.warning("starting without the added items: the item store is down (%s)", err)
        watch: EpochWatch | None = None
        journal: Journal | None = None
        inner: ProfileStore
        if settings.redis_url:
            redis = RedisProfileStore.from_url(
                settings.redis_url,
                prefix=settings.redis_prefix,
                max_connections=settings.redis_max_connections,
                deadline_s=settings.redis_timeout_ms / 1000,
                write_deadline_s=settings.redis_write_timeout_ms / 1000,
                wait_replicas=settings.redis_wait_replicas,
                wait_timeout_ms=settings.redis_wait_timeout_ms,
            )
            inner, name, cache_size = redis, "redis", settings.profile_cache_size
            journal = Journal(settings.journal_events)
            watch = EpochWatch(
                redis, histories=profiles, journal=journal, on_loss=metrics.data_losses.inc
            )
        else:
            memory = MemoryProfileStore(
                max_users=settings.memory_store_max_users, on_evict=metrics.evictions.inc
            )
            inner, name, cache_size = memory, "memory", 0  # it never fails
        store = ResilientStore(inner, cache_size=cache_size, journal=journal)
        try:
            if watch is not None:  # Redis: the histories go in once per data set
                await watch.start()
            elif profiles:
                await store.load(profiles)
        except StoreUnavailable as err:  # serve degraded reads; the watch sets Redis up later
            log.warning(
                "starting while Redis is down (%s): reads are degraded until it answers", err
            )
        # Everything loaded so far lives as long as the app: keep it out of the cyclic garbage
        # collector's full passes, whose pauses were the p99 of a loaded server.
        gc.freeze()
        syncing = (
            asyncio.create_task(_sync_items(items, models, catalogue, settings.items_sync_s))
            if settings.items_sync_s
            else None
        )
        registry = registry_of(settings)
        following = (
            asyncio.create_task(
                _follow_registry(registry, models, serving, settings.registry_poll_s)
            )
            if registry
            else None
        )
        watching = asyncio.create_task(watch.run(EPOCH_CHECK_S)) if watch else None
        try:
            window = settings.batch_window_ms / 1000
            with reload_on_hangup(models, asyncio.get_running_loop()):
                # The batcher asks the slot, so a batch runs on the engine current at its start.
                async with MicroBatcher(models.recommend, window_s=window) as batcher:
                    state = State(models, store, name, batcher, watch, items)
                    yield {
                        "app_state": state,
                        "catalogue": catalogue,
                        "models": models,
                        "items": items,
                    }
        finally:
            for task in (watching, syncing, following):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await store.close()
            await items.store.close()

    app = FastAPI(
        title="visrec",
        description="Visual recommendations with Attentive Collaborative Filtering: top-k items "
        "for a user or a history, their explanation, and the interactions that update profiles.",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, without a CDN
        redoc_url=None,  # ReDoc loads from a CDN too
    )
    install_docs(app)
    metrics = Metrics()
    metrics.install(app)
    # an image upload's form: the image and a few short fields
    upload = settings.max_image_bytes + 65_536
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, per_path={"/items": upload})
    access = Access(
        keys=Keys(key_list(settings.api_keys), key_list(settings.admin_keys), settings.auth_reads),
        limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_burst),
        failures=RateLimiter(settings.auth_failures_per_s, settings.auth_failure_burst),
        proxies=Proxies.parse(settings.trusted_proxies),
    )
    guards = Guards.of(access)
    _routes(app, metrics, guards)
    install_admin(app, dependencies=guards.admin, roots=settings.reload_roots())
    install_items(app, dependencies=guards.admin)
    install_ui(app, page=guards.page, read=guards.read)

    @app.exception_handler(UnknownItemsError)
    async def unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        return JSONResponse(
            status_code=422, content={"detail": str(exc), "unknown_item_ids": exc.items}
        )

    @app.exception_handler(EventConflict)
    async def event_conflict(request: Request, exc: EventConflict) -> JSONResponse:
        body = ConflictingEvents(detail=str(exc), event_ids=exc.event_ids)
        return JSONResponse(status_code=409, content=body.model_dump())

    @app.exception_handler(FutureTimestamps)
    async def future_timestamps(request: Request, exc: FutureTimestamps) -> JSONResponse:
        body = FutureEvents(detail=str(exc), timestamps=exc.timestamps)
        return JSONResponse(status_code=422, content=body.model_dump())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_request(request, exc)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        body = StoreRefused(
            detail=f"the profile store is unavailable: {exc.reason}. {_outcome(exc)}",
            reason=exc.reason,
            nothing_applied=not exc.maybe_applied,
        )
        return JSONResponse(status_code=503, content=body.model_dump(), headers=headers)

    return app


class FutureTimestamps(ValueError):
    def __init__(self, timestamps: list[float]) -> None:
        super().__init__(
            f"event timestamp(s) more than {MAX_CLOCK_SKEW_S // 3600} h ahead of the server's "
            f"clock: {', '.join(map(str, timestamps))}; nothing was applied"
        )
        self.timestamps = timestamps


def _require_present(body: InteractionsRequest) -> None:
    """Refuse events from the future: one would stay a user's newest item for good."""
    latest = time.time() + MAX_CLOCK_SKEW_S
    ahead = [e.timestamp for e in body.events if e.timestamp is not None and e.timestamp > latest]
    if ahead:
        raise FutureTimestamps(ahead)


def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without echoing the input: a NaN, an infinity or a lone surrogate in it
    cannot be written as JSON, and the default handler answered 500 instead. A body that is not
    JSON by its Content-Type (``curl -d`` sends a form) is told so, with 415."""
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type) and any(e["loc"] == ("body",) for e in errors):
        detail = (
            "the body must be JSON sent with Content-Type: application/json, not "
            f"{content_type or 'without a Content-Type'}"
        )
        return JSONResponse(status_code=415, content={"detail": _printable(detail)})
    fields = [
        {
            "loc": [_printable(x) if isinstance(x, str) else x for x in e["loc"]],
            "msg": _printable(e["msg"]),
            "type": e["type"],
        }
        for e in errors
    ]
    return JSONResponse(status_code=422, content={"detail": fields})


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so it can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _outcome(exc: StoreUnavailable) -> str:
    """What a client refused with 503 should know about its request (README: "Durability")."""
    if not exc.maybe_applied:
        return "Nothing was applied; retry later (with event_ids, a retry is always safe)."
    return (
        "The request reached the store but its answer did not come back in time: a batch is "
        "applied whole or not at all, and which is unknown. Send it again with the same "
        "event_ids: each event is applied at most once."
    )


async def _state(request: Request) -> State:  # async: no thread-pool hand-off per request
    state: State = request.state.app_state
    return state


StateDep = Annotated[State, Depends(_state)]


def _response(
    user_id: str | None, rec: Recommendation, *, degraded: bool = False
) -> RecommendResponse:
    pairs = zip(rec.items, rec.scores, strict=True)
    if rec.fallback:  # the engine ranks popular items by their interaction counts
        items = [ScoredItem(item_id=i, score=None, popularity=round(n)) for i, n in pairs]
    else:
        items = [ScoredItem(item_id=i, score=s, popularity=None) for i, s in pairs]
    return RecommendResponse(
        user_id=user_id,
        items=items,
        model_version=rec.version,  # of the engine that answered, also across a reload
        fallback=rec.fallback,
        degraded=degraded,
    )


@dataclass(frozen=True)
class Guards:
    """Route dependencies per role (see ``service.api.security``)."""

    read: list[Any]
    write: list[Any]
    admin: list[Any]
    page: list[Any]  # the explanation page's HTML: rate-limited, no key (a browser sends none)

    @classmethod
    def of(cls, access: Access) -> Guards:
        def deps(role: Role) -> list[Any]:
            return [Depends(guard(access, role))]

        return cls(deps("read"), deps("write"), deps("admin"), [Depends(rate_limited(access))])


def _routes(app: FastAPI, metrics: Metrics, guards: Guards) -> None:
    store_stage, model_stage = metrics.stages.labels("store"), metrics.stages.labels("model")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (nothing else is checked)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready)
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

    @app.get(
        "/recommend/{user_id}",
        response_model=RecommendResponse,
        dependencies=guards.read,
        responses=GUARDED,
    )
    async def recommend_user(
        user_id: UserIdInPath,
        state: StateDep,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_K)] = 0,
        exclude_seen: bool = True,
    ) -> RecommendResponse:
        """The top ``k`` items for a stored user (after ``offset``), best first, unseen ones only
        unless ``exclude_seen=false``. A user with no profile gets popular items
        (``fallback``); while the profile store is down, the answer is ranked from this
        server's cached copy of the profile (``degraded``)."""
        with store_stage.time():
            read = await state.store.read([user_id])  # cached or empty when the store is down
        (profile,) = read.profiles
        seen = profile.seen if exclude_seen else frozenset()
        with model_stage.time():
            rec = await state.batcher.submit(RecQuery(user_id, profile.recent, seen, k, offset))
        return _response(user_id, rec, degraded=read.degraded)

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        dependencies=guards.read,
        responses=GUARDED | JSON_BODY | UNKNOWN_ITEMS,
    )
    async def recommend_history(body: HistoryRequest, state: StateDep) -> RecommendResponse:
        """The top ``k`` items for a history given in the body (raw item ids, oldest first; the
        last 9 count), e.g. for an anonymous visitor. Needs no profile store."""
        state.engine.require_known(body.history)
        seen = set(body.history) if body.exclude_seen else set()
        rec = await state.batcher.submit(RecQuery(None, body.history, seen, body.k, body.offset))
        return _response(None, rec)

    @app.post(
        "/interactions",
        response_model=InteractionsResponse,
        dependencies=guards.write,
        responses=GUARDED | JSON_BODY | EVENTS_REFUSED | STORE_NEEDED,
    )
    async def interactions(body: InteractionsRequest, state: StateDep) -> InteractionsResponse:
        """Record a batch of interactions: applied whole or not at all, each event with an
        ``event_id`` at most once. The next ``/recommend`` of those users sees them."""
        state.engine.require_known([e.item_id for e in body.events])  # else none is applied
        _require_present(body)
        events = [Interaction(e.user_id, e.item_id, e.timestamp, e.event_id) for e in body.events]
        applied = await state.store.add(events)
        return InteractionsResponse(received=len(events), applied=applied)

    @app.get(
        "/explain/{user_id}",
        response_model=ExplainResponse,
        dependencies=guards.read,
        responses=GUARDED | UNKNOWN_ITEMS | STORE_NEEDED,
    )
    async def explain_user(user_id: UserIdInPath, item_id: int, state: StateDep) -> ExplainResponse:
        """Why ``item_id`` scores as it does for a stored user: the item-level attention over
        their last items and each item's 7x7 component attention, and the score (a served
        SASRec gives its newest position's attention over those items, and no components)."""
        (history,) = await state.store.recent([user_id])
        return await _explain(state, user_id, history, item_id)

    @app.post(
        "/explain",
        response_model=ExplainResponse,
        dependencies=guards.read,
        responses=GUARDED | JSON_BODY | UNKNOWN_ITEMS,
    )
    async def explain_history(body: ExplainRequest, state: StateDep) -> ExplainResponse:
        """The same explanation for a history given in the body."""
        state.engine.require_known(body.history)
        return await _explain(state, None, body.history, body.item_id)


async def _explain(
    state: State, user_id: str | None, history: Sequence[int], item_id: int
) -> ExplainResponse:
    """The attentions behind ``item_id`` over the profile that ``/recommend`` ranks with."""
    engine = state.engine  # one model for the whole answer, also across a reload
    why = await run_in_threadpool(engine.explain, user_id, history, item_id)
    heatmaps = why.component_attention
    profile = [
        ProfileItem(
            item_id=raw,
            attention=float(a),
            components=None if heatmaps is None else heatmaps[j].tolist(),
        )
        for j, (raw, a) in enumerate(
            zip(engine.raw_ids(why.profile), why.item_attention, strict=True)
        )
    ]
    return ExplainResponse(
        user_id=user_id,
        item_id=item_id,
        score=why.score,
        profile=profile,
        tags=[SharedTag(tag=t, attention=a) for t, a in why.tags.items()],
        model_version=engine.version,
    )
