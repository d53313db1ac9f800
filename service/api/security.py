"""Who may call what: API keys for writes and admin calls (reads optionally), and per-caller
rate limits.

Keys travel in the ``X-API-Key`` header and are compared in constant time. An admin key may do
everything a write key may. A caller is limited by a token bucket per *valid* key, or per client
address otherwise (a made-up key per request is the address's bucket too); over the limit it
gets 429 with ``Retry-After``. Failed authentications take tokens from a bucket of their own per
address; once it is empty, the address's wrong keys get 429 instead of 401, and a valid key from
it still works (behind NAT or a proxy, one client's guesses must not lock out the others; keys
are long and random, so a block never stood between a guesser and a key anyway). The client
address is the TCP peer, or what ``X-Forwarded-For`` says when the peer is a trusted proxy.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any, Literal

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import BodyRefused, problem
from service.errors import Refused

Role = Literal["read", "write", "admin"]
IPNetwork = IPv4Network | IPv6Network
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
        return self.valid(key, self.admin if role == "admin" else self.write + self.admin)

    def valid(self, key: str | None, allowed: tuple[str, ...] | None = None) -> bool:
        """Whether ``key`` is one of ``allowed`` (default: any configured key)."""
        if key is None:
            return False
        allowed = self.write + self.admin if allowed is None else allowed
        # Every key is compared, so the time taken does not say which one came close.
        raw = key.encode("utf-8", "surrogateescape")
        matches = [hmac.compare_digest(raw, k.encode()) for k in allowed]
        return any(matches)


@dataclass(frozen=True)
class Proxies:
    """Peers whose ``X-Forwarded-For`` is believed (IP addresses or networks)."""

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Proxies:
        return cls(
            tuple(
                ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
            )
        )

    def trusts(self, host: str) -> bool:
        try:
            address = ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client(self, request: Request) -> str:
        """The client's address: the peer, unless the peer is a trusted proxy; then the
        right-most address of ``X-Forwarded-For`` that is not a trusted proxy itself."""
        peer = request.client.host if request.client else "unknown"
        if not self.trusts(peer):
            return peer
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self.trusts(hop):
                return hop
        return peer


@dataclass
class RateLimiter:
    """Token buckets of ``rate`` tokens per second holding up to ``burst``, one per caller;
    the least recently seen callers are forgotten beyond ``max_callers``."""

    rate: float
    burst: int
    clock: Clock = time.monotonic
    max_callers: int = 100_000
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def peek(self, caller: str) -> float:
        """Seconds until ``caller`` has a token (0: it has one), taking none."""
        if self.rate <= 0 or caller not in self._buckets:
            return 0.0
        tokens, last = self._buckets[caller]
        tokens = min(float(self.burst), tokens + (self.clock() - last) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

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


@dataclass(frozen=True)
class Access:
    """What a guard checks: keys, the request rate, failed authentications, client addresses."""

    keys: Keys
    limiter: RateLimiter
    failures: RateLimiter
    proxies: Proxies = Proxies()


def _too_many(wait: float, why: str) -> Refused:
    return Refused(
        429, "rate_limited", f"{why}; retry later", headers={"Retry-After": str(math.ceil(wait))}
    )


def guard(access: Access, role: Role) -> Callable[..., object]:
    """A route dependency: 401 without a valid key for ``role``, 429 over the rate limit or
    after too many failed authentications from the address.

    Where no key is needed (open reads) the dependency reads the header itself instead of
    declaring the API-key scheme, so the OpenAPI schema does not demand a key it won't check.
    """
    keys = access.keys

    def enforce(request: Request, key: str | None) -> None:
        client = access.proxies.client(request)
        if not keys.allows(key, role):  # a key was needed and this one is not it
            blocked = access.failures.peek(f"addr:{client}")
            if blocked > 0:
                raise _too_many(blocked, "too many failed authentications from this address")
            access.failures.wait(f"addr:{client}")
            raise Refused(
                401,
                "unauthorized",
                f"this call needs a valid {role} API key in the X-API-Key header",
                headers={"WWW-Authenticate": "X-API-Key"},
            )
        # Only a key that checks out has a bucket of its own: made-up keys share the address's.
        caller = f"key:{key}" if keys.valid(key) else f"addr:{client}"
        wait = access.limiter.wait(caller)
        if wait > 0:
            raise _too_many(wait, "rate limit exceeded")

    # async: FastAPI runs a plain ``def`` dependency on its thread pool, a hand-off per request
    async def declared(request: Request, key: str | None = Security(API_KEY)) -> None:
        enforce(request, key)

    async def undeclared(request: Request) -> None:
        enforce(request, request.headers.get(API_KEY.model.name))

    return undeclared if keys.allows(None, role) else declared


@dataclass(frozen=True)
class Guards:
    """Route dependencies per role, for a router's ``dependencies=``."""

    read: list[Any]
    write: list[Any]
    admin: list[Any]
    page: list[Any]  # the explanation page's HTML: rate-limited, no key (a browser sends none)

    @classmethod
    def of(cls, access: Access) -> Guards:
        def deps(role: Role) -> list[Any]:
            return [Depends(guard(access, role))]

        return cls(deps("read"), deps("write"), deps("admin"), [Depends(rate_limited(access))])

    @classmethod
    def open(cls) -> Guards:
        """No key, no rate limit (an app in a test)."""
        return cls([], [], [], [])


def rate_limited(access: Access) -> Callable[..., object]:
    """A route dependency that only rate-limits, by client address (for what needs no key)."""

    async def limit(request: Request) -> None:
        wait = access.limiter.wait(f"addr:{access.proxies.client(request)}")
        if wait > 0:
            raise _too_many(wait, "rate limit exceeded")

    return limit


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
            await problem(413, "body_too_large", reason)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # raised inside the app: its handler answers JSON
                raise BodyRefused(413, "body_too_large", reason)
            return message

        await self.app(scope, limited, send)
