"""Reaching Redis: clients for one node or a Cluster, a deadline on every call, and what a
failure means (an outage, retried by the caller, or a bad call).

When Redis cannot answer now (down, refusing connections, slower than the deadline, out
of pooled connections, loading, refusing writes), a call raises :class:`StoreUnavailable`
(``ping`` and ``durable`` say so instead); other errors, those of a bad call, stay what they
are. ``RedisProfileStore`` bounds ``profiles``, ``ping`` and ``durable`` by one deadline
(``deadline_s``) and ``add`` by another (``write_deadline_s``), each covering the wait for a
pooled connection, connecting and the reply, so a slow Redis costs a caller at most that long.
Only the time the event loop was free to read Redis's reply counts
(``service.store.redis.deadline``): a loop busy with other requests does not turn a healthy
Redis's prompt reply into a timeout.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode

from service.store.profiles import StoreUnavailable
from service.store.redis.deadline import LoopLag, deadline

# Replies that mean "not now" rather than "wrong call": a failed disk write (MISCONF), a script
# running too long (BUSY), too few replicas acknowledging (NOREPLICAS). A pipeline's error text is
# "Command # n (...) of pipeline caused error: ('MISCONF ...',)": the code is looked for after it.
_NOT_NOW_REPLY = re.compile(r"(?:^|caused error: \(['\"])(MISCONF|BUSY|NOREPLICAS)\b")
_NOT_NOW = (
    OSError,  # refused or reset connections, and the deadline (TimeoutError is an OSError)
    rx.ConnectionError,  # also a pool without a free connection, and LOADING after a restart
    rx.TimeoutError,
    rx.OutOfMemoryError,
    rx.ReadOnlyError,
    rx.TryAgainError,
    rx.ClusterDownError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot answer now, as opposed to a bad call (a script error,
    a wrong argument), which should stay an error."""
    if isinstance(exc, _NOT_NOW):
        return True
    return isinstance(exc, rx.ResponseError) and _NOT_NOW_REPLY.search(str(exc)) is not None


# Refusals after which the store certainly applied nothing: it said no before running anything
# (a script declared as writing is refused whole when Redis is out of memory, read-only or
# loading; a transaction refused at EXEC runs none of its commands), or it was never reached.
_REFUSED = (
    rx.OutOfMemoryError,
    rx.ReadOnlyError,
    rx.BusyLoadingError,
    rx.TryAgainError,
    ConnectionRefusedError,
)


def nothing_applied(exc: BaseException) -> bool:
    """Whether a write that failed with ``exc`` (an outage) certainly changed nothing."""
    if isinstance(exc, (*_REFUSED, rx.ResponseError)):
        return True  # a ResponseError here is MISCONF, BUSY or NOREPLICAS: refused up front
    text = str(exc)
    return isinstance(exc, rx.ConnectionError) and (
        (text.startswith("Error ") and " connecting to " in text)  # never connected
        or text == "No connection available."  # waited for the pool, sent nothing
    )


def why_refused(exc: BaseException) -> str:
    """A short reason for an outage, in words an operator can act on."""
    if isinstance(exc, rx.OutOfMemoryError):
        return "Redis is out of memory (used_memory over maxmemory, noeviction): writes refused"
    if isinstance(exc, rx.ReadOnlyError):
        return "Redis is a read-only replica: writes refused"
    if isinstance(exc, rx.BusyLoadingError):
        return "Redis is loading its data after a restart"
    if isinstance(exc, TimeoutError | rx.TimeoutError):
        return "Redis did not answer within the deadline"
    return "Redis did not answer"


def reply_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def write_refusal(info: Mapping[str, object]) -> str | None:
    """Why a Redis whose ``INFO`` reads ``info`` refuses writes, or None."""
    used, limit = _int(info.get("used_memory")), _int(info.get("maxmemory"))
    if limit and used >= limit and info.get("maxmemory_policy") == "noeviction":
        return (
            f"Redis is out of memory ({used:,} bytes used of maxmemory {limit:,}, noeviction): "
            "writes are refused until memory is freed or maxmemory raised"
        )
    if info.get("role") == "slave" and _int(info.get("slave_read_only")):
        return "Redis is a read-only replica: writes are refused"
    return None


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


@asynccontextmanager
async def reaching(deadline_s: float | None, lag: LoopLag) -> AsyncIterator[None]:
    """Redis calls within ``deadline_s`` of responsive loop time (None: no deadline), with
    outages raised as StoreUnavailable and bad calls left as they are. A call cut off by the
    deadline leaves no half-read reply behind: redis-py closes a connection interrupted
    mid-command instead of returning it to the pool."""
    try:
        async with deadline(deadline_s, lag):
            yield
    except Exception as exc:
        if is_outage(exc):
            cause = f"{why_refused(exc)} ({type(exc).__name__}: {exc})"
            raise StoreUnavailable(cause, maybe_applied=not nothing_applied(exc)) from exc
        raise


CLUSTER_SCHEME = "redis+cluster://"


def redis_client(
    url: str, *, timeout_s: float = 2.0, max_connections: int = 200
) -> aioredis.Redis | aioredis.RedisCluster:
    """A client whose pool makes callers wait (up to ``timeout_s``) for a free connection: the
    default pool raises "Too many connections" once a burst of requests exceeds its size.

    ``redis+cluster://host:port[,host:port...]`` names a Redis Cluster by one or more of its
    nodes (the client finds the others and follows slot moves and failovers); the pool size is
    then per node."""
    if url.startswith(CLUSTER_SCHEME):
        nodes = [
            _cluster_node(n) for n in url.removeprefix(CLUSTER_SCHEME).split("/")[0].split(",")
        ]
        return aioredis.RedisCluster(
            startup_nodes=nodes,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
    return single_client(url, timeout_s=timeout_s, max_connections=max_connections)


def single_client(url: str, *, timeout_s: float, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pool)


def _cluster_node(address: str) -> ClusterNode:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a Redis Cluster URL lists host:port nodes, got {address!r}")
    return ClusterNode(host, int(port))
