"""Who may call what: API keys for writes and admin calls (reads optionally), and per-caller
rate limits.

Keys travel in the ``X-API-Key`` header and are compared in constant time. An admin key may do
everything a write key may. A caller is limited by a token bucket per key, or per client address
when it sends none; over the limit it gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from fastapi import HTTPException, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Role = Literal["read", "write", "admin"]
Clock = Callable[[], float]

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


@dataclass(frozen=True)
class Keys:
    write: tuple[str, ...]
    admin: tuple[str, ...]
    auth_reads: bool

    @property
    def open(self) -> bool:
        """No keys configured (development only, which Settings enforces): nothing is locked."""
        return not self.write and not self.admin

    def allows(self, key: str | None, role: Role) -> bool:
        if self.open or (role == "read" and not self.auth_reads):
            return True
        if key is None:
            return False
        allowed = self.admin if role == "admin" else self.write + self.admin
        # Every key is compared, so the time taken does not say which one came close.
        matches = [hmac.compare_digest(key.encode(), k.encode()) for k in allowed]
        return any(matches)


@dataclass
class RateLimiter:
    """Token buckets of ``rate`` tokens per second holding up to ``burst``, one per caller;
    the least recently seen callers are forgotten beyond ``max_callers``."""

    rate: float
    burst: int
    clock: Clock = time.monotonic
    max_callers: int = 100_000
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def wait(self, caller: str) -> float:
        """Take a token for ``caller``: 0 when allowed, else the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, last = self._buckets.pop(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            tokens -= 1
            wait = 0.0
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[caller] = (tokens, now)
        if len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
        return wait


def guard(keys: Keys, limiter: RateLimiter, role: Role) -> Callable[..., object]:
    """A route dependency: 401 without a valid key for ``role``, 429 over the rate limit.

    Where no key is needed (open reads) the dependency reads the header itself instead of
    declaring the API-key scheme, so the OpenAPI schema does not demand a key it won't check.
    """

    def enforce(request: Request, key: str | None) -> None:
        if not keys.allows(key, role):
            raise HTTPException(
                status_code=401,
                detail=f"this call needs a valid {role} API key in the X-API-Key header",
                headers={"WWW-Authenticate": "X-API-Key"},
            )
        client = request.client.host if request.client else "unknown"
        wait = limiter.wait(f"key:{key}" if key else f"addr:{client}")
        if wait > 0:
            raise HTTPException(
                status_code=429,
                detail="rate limit exceeded; retry later",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    # async: FastAPI runs a plain ``def`` dependency on its thread pool, a hand-off per request
    async def declared(request: Request, key: str | None = Security(API_KEY)) -> None:
        enforce(request, key)

    async def undeclared(request: Request) -> None:
        enforce(request, request.headers.get(API_KEY.model.name))

    return undeclared if keys.allows(None, role) else declared


class BodyLimit:
    """413 with a JSON reason for a body over ``max_bytes`` (or over ``per_path[path]`` for
    those paths, e.g. image uploads): at once when the declared ``Content-Length`` says so,
    else as soon as the bytes read pass it."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, per_path: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        reason = f"the request body is over {limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await JSONResponse({"detail": reason}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # raised inside the app: its handler answers JSON
                raise HTTPException(status_code=413, detail=reason)
            return message

        await self.app(scope, limited, send)
