"""Prometheus metrics: request latency per endpoint, and per stage inside a request."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

# Milliseconds matter here: the goals are a p50 of a few ms and a p99 of tens of ms.
BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """One registry per app (no process-wide globals, so several apps can live in a test)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "visrec_request_seconds",
            "Request latency by endpoint",
            ["method", "endpoint", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "visrec_stage_seconds",
            "Latency of the stages inside a request (store read, model batch)",
            ["stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def install(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def timed(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            started = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")  # the template, not the raw path
            self.requests.labels(request.method, endpoint, str(response.status_code)).observe(
                time.perf_counter() - started
            )
            return response

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
