"""``visrec-ingest``: one consumer of the events stream (:mod:`service.ingest`), as a process.

Run as many as needed, anywhere (``--name`` must differ; the default, host and pid, does): they
share the stream's consumer group. Settings are the service's ``VISREC_*`` variables
(``VISREC_REDIS_URL`` is needed; ``VISREC_REGISTRY`` or ``--features`` says which items exist).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field

from service.config import RegistrySettings
from service.ingest import Consumer
from service.model.feature_store import load_features
from service.registry import Registry
from service.store.items import RedisItemStore
from service.store.redis.client import redis_client
from service.store.redis.profiles import RedisProfileStore

log = logging.getLogger("visrec.ingest")
KNOWN_REFRESH_S = 5.0  # how often the items the model knows are read again


class IngestSettings(RegistrySettings):
    """The service's settings a consumer reads (same variables, same meaning)."""

    features: Path | None = None  # without a registry: the serving features' folder
    redis_write_timeout_ms: Annotated[float, Field(gt=0, le=60_000)] = 2000.0
    redis_wait_replicas: Annotated[int, Field(ge=0, le=16)] = 0
    redis_wait_timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 200


class KnownItems:
    """The items ``POST /interactions`` would accept: the serving version's and those added
    while serving, read again every ``KNOWN_REFRESH_S``."""

    def __init__(self, settings: IngestSettings) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.ids: frozenset[int] = frozenset()
        self._served: tuple[Path, frozenset[int]] | None = None  # features read, and their ids
        self._added = RedisItemStore.from_url(
            settings.redis_url, prefix=settings.redis_prefix, deadline_s=5.0
        )

    def features(self) -> Path:
        s = self.settings
        if s.registry is not None and s.redis_url:
            found = Registry(s.registry, s.redis_url, s.redis_prefix).current_files()
            if found is not None:
                return found[2]
        if s.features is None:
            raise ValueError("say which items exist: VISREC_REGISTRY, or --features DIR")
        return s.features

    async def refresh(self) -> None:
        """The serving version's items (read again only when another version serves: a
        million ids take a while to parse) and those added while serving."""
        features = self.features()
        if self._served is None or self._served[0] != features:
            _, meta = await asyncio.to_thread(load_features, features)
            self._served = features, frozenset(meta.item_ids)
        self.ids = self._served[1] | frozenset(await self._added.ids())

    async def keep_current(self) -> None:
        while True:
            await asyncio.sleep(KNOWN_REFRESH_S)
            try:
                await self.refresh()
            except Exception as err:  # the last ids read stay in force
                log.warning("known items not refreshed: %s", err)


async def consume(settings: IngestSettings, name: str, batch: int) -> Consumer:
    """Run one consumer until SIGTERM or SIGINT; it, with its counts."""
    assert settings.redis_url is not None
    known = KnownItems(settings)
    await known.refresh()
    store = RedisProfileStore.from_url(
        settings.redis_url,
        prefix=settings.redis_prefix,
        write_deadline_s=settings.redis_write_timeout_ms / 1000,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
    client = redis_client(settings.redis_url)
    consumer = Consumer(client, store, settings.redis_prefix, name, lambda: known.ids, batch)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    refreshing = asyncio.create_task(known.keep_current())
    log.info("consumer %s reads %s:events", name, settings.redis_prefix)
    try:
        await consumer.run(stop)
    finally:
        refreshing.cancel()
        await store.close()
        await client.aclose()
    return consumer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visrec-ingest", description=__doc__)
    parser.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--batch", type=int, default=1000, help="entries read at a time")
    parser.add_argument("--features", type=Path, help="the serving features (no registry)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = IngestSettings()
    if args.features is not None:
        settings.features = args.features
    if not settings.redis_url:
        log.error("VISREC_REDIS_URL is not set: the stream lives in Redis")
        return 2
    try:
        done = asyncio.run(consume(settings, args.name, args.batch))
    except ValueError as err:
        log.error("%s", err)
        return 2
    print(f"consumer {done.name}: {done.applied} events applied, {done.dead} dead-lettered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
