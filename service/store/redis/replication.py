"""How far a write reaches before it is acknowledged: ``WAIT`` for replicas after the write, on
the same connection, and on a Redis Cluster the primary that holds the write's slot (found again
in the background after a failover moved it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx

from service.store.profiles import StoreUnavailable
from service.store.redis.client import single_client

# A registered script: called with keys, args and (optionally) the client to run on.
Script = Callable[..., Awaitable[Any]]


class Replication:
    """``replicas`` > 0: a write returns only once that many replicas have it (``WAIT``, up to
    ``timeout_ms``), else raises StoreUnavailable (maybe applied): then a failover, which
    promotes a replica, keeps every acknowledged write. On a cluster that takes a client of
    the key's primary (``timeout_s``, ``max_connections``: as the store's own client)."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        *,
        replicas: int,
        timeout_ms: int,
        timeout_s: float,
        max_connections: int,
    ) -> None:
        self.client = client
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._timeout_s, self._max_connections = timeout_s, max_connections
        self._nodes: dict[str, aioredis.Redis] = {}  # a cluster's primaries, for WAIT
        self._refresh: asyncio.Task[None] | None = None

    async def write(self, script: Script, keys: list[str], args: list[str | int]) -> list[Any]:
        """``script``, then ``WAIT`` on the same connection (WAIT counts the replicas that have
        that connection's writes), on the node that holds ``keys``."""
        if not self.replicas:
            return list(await script(keys=keys, args=args))
        try:
            async with (await self._node_of(keys[0])).client() as conn:
                reply = list(await script(keys=keys, args=args, client=conn))
                wait = ("WAIT", self.replicas, self.timeout_ms)
                acked = int(await conn.execute_command(*wait))
        except rx.MovedError as exc:  # refused by a node that no longer holds the slot
            self._find_nodes_again()
            raise StoreUnavailable(f"the cluster moved: {exc}", maybe_applied=False) from exc
        except BaseException:  # an outage, or the deadline: a failover, maybe
            self._find_nodes_again()
            raise
        if acked < self.replicas:
            raise StoreUnavailable(
                f"the write reached {acked} of {self.replicas} replica(s) within "
                f"{self.timeout_ms} ms: not acknowledged (send it again with its event ids)",
                maybe_applied=True,
            )
        return reply

    async def _node_of(self, key: str) -> aioredis.Redis:
        """A client of the primary that holds ``key``: the store's own, or a cluster node's."""
        cluster = self.client
        if not isinstance(cluster, aioredis.RedisCluster):
            return cluster
        await cluster.initialize()  # a no-op once it knows the slots
        node = cluster.get_node_from_key(key)
        if node is None:  # a slot no primary holds: mid-failover
            raise rx.ClusterDownError(f"no primary holds {key!r} now")
        if node.name not in self._nodes:  # pooled as the store's own client is
            self._nodes[node.name] = single_client(
                f"redis://{node.host}:{node.port}",
                timeout_s=self._timeout_s,
                max_connections=self._max_connections,
            )
        return self._nodes[node.name]

    def _find_nodes_again(self) -> None:
        """Ask the cluster again which primary holds which slots, in the background (a
        request's deadline must not cut it short), once at a time."""
        cluster = self.client
        if isinstance(cluster, aioredis.RedisCluster) and (
            self._refresh is None or self._refresh.done()
        ):
            self._refresh = asyncio.create_task(_refreshed(cluster))

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for node in self._nodes.values():
            await node.aclose()


async def _refreshed(cluster: aioredis.RedisCluster) -> None:
    with contextlib.suppress(rx.RedisError, OSError):  # mid-failover: the next one will
        await cluster.nodes_manager.initialize()
