"""Prometheus metrics: request latency per endpoint, and per stage inside a request."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        self.data_losses = Counter(
            "visrec_store_data_losses",
            "Times the profile store was found to have lost its data (Redis back empty)",
            registry=self.registry,
        )
        self.items_lost = Counter(
            "visrec_added_items_lost",
            "Added items found missing from the item store (Redis back empty), then put back",
            registry=self.registry,
        )
        self.evictions = Counter(
            "visrec_memory_store_evicted_users",
            "Users the in-process profile store forgot to stay within its bound (LRU)",
            registry=self.registry,
        )
        self.model = Info(
            "visrec_model", "The model version this process serves", registry=self.registry
        )
        self.model_version: Callable[[], str] | None = None  # set once the model is loaded
        self.stages = Histogram(
            "visrec_stage_seconds",
            "Latency of the stages inside a request (store read, model batch)",
            ["stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.impressions = Counter(
            "visrec_feedback_impressions",
            "Items shown (POST /feedback), once per answer and item, by model version and arm",
            ["version", "arm"],
            registry=self.registry,
        )
        self.clicks = Counter(
            "visrec_feedback_clicks",
            "Items chosen (POST /feedback), once per answer and item, by model version, arm "
            "and rank in the answer (1-20, then 21+)",
            ["version", "arm", "rank"],
            registry=self.registry,
        )
        self.answers_unkept = Counter(
            "visrec_feedback_answers_unkept",
            "Answers whose request_id the feedback store did not take (down): feedback on "
            "them is refused as unknown",
            registry=self.registry,
        )
        self.store_stage = self.stages.labels("store")  # reading the user's profile
        self.model_stage = self.stages.labels("model")  # their micro-batch of the model

    def exposition(self) -> Response:
        """``GET /metrics``: every metric in Prometheus's text format."""
        if self.model_version is not None:
            self.model.info({"version": self.model_version()})
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class TimedRequests:
    """Times each HTTP request by its route template and status. A plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` costs a task group and a stream per request."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the template
            self.histogram.labels(scope["method"], endpoint, str(status)).observe(
                time.perf_counter() - started
            )
