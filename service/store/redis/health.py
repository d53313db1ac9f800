"""What Redis says of itself that a write's fate depends on: whether it fsyncs every write
(AOF ``always``), whether it refuses writes now (out of memory, a read-only replica), and on a
cluster whether every primary has a replica. Each asks every node of a cluster; calls raise
as the client does (callers bound them and classify outages)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from service.store.redis.client import write_refusal


async def each_node(
    client: aioredis.Redis | aioredis.RedisCluster,
    command: Callable[..., Awaitable[Any]],
    *args: object,
) -> list[Any]:
    """``command``'s answer from Redis, or from every node of a cluster."""
    if not isinstance(client, aioredis.RedisCluster):
        return [await command(*args)]
    answers = await command(*args, target_nodes=aioredis.RedisCluster.ALL_NODES)
    return list(answers.values())


async def fsyncs_every_write(client: aioredis.Redis | aioredis.RedisCluster) -> bool:
    """``appendonly yes`` and ``appendfsync always`` on every node: then an acknowledged write
    survives a crash of Redis or of its machine."""
    configs = await each_node(client, client.config_get, "append*")
    return all(c.get("appendonly") == "yes" and c.get("appendfsync") == "always" for c in configs)


async def refusing_writes(client: aioredis.Redis | aioredis.RedisCluster) -> str | None:
    """From ``INFO memory replication`` of every primary: out of memory under ``noeviction``,
    or a read-only replica; None when it takes writes."""
    infos = await each_node(client, client.execute_command, "INFO", "memory", "replication")
    cluster = isinstance(client, aioredis.RedisCluster)
    primaries = [i for i in infos if not (cluster and i.get("role") == "slave")]
    return next((r for r in map(write_refusal, primaries) if r), None)


def cluster_replication(nodes: dict[str, dict[str, Any]]) -> str:
    """From ``CLUSTER NODES``: whether every primary has a replica to take over its slots
    (else durability is per node)."""
    primaries = {  # a node that joins shows as a master without slots for a while
        n["node_id"] for n in nodes.values() if "master" in n["flags"] and n["slots"]
    }
    covered = {n["master_id"] for n in nodes.values() if "slave" in n["flags"]}
    bare = len(primaries - covered)
    if not bare:
        return f"Redis Cluster of {len(primaries)} primaries, each with a replica"
    return (
        f"Redis Cluster of {len(primaries)} primaries, {bare} without a replica: durability "
        "is per node (a lost primary loses its slots' data)"
    )
