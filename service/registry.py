"""A model registry: immutable versions in a folder, the current one named in Redis.

A version is what an engine is built from (``checkpoint.pt`` and the ``features/`` folder),
copied under ``<root>/<version>/`` once and never changed; its name is the first 12 hex digits
of the checkpoint's sha256. ``visrec publish`` also writes the version's serving tables into
its features folder (``service.model.tables``) before it becomes current, so replicas only map
them (a version stored otherwise gets them from the first process that serves it).

Which version serves is one Redis key, ``<prefix>:model:current``,
holding ``<generation> <version>``; every publish and every rollback takes the next generation
(``INCR <prefix>:model:generation``), announces it on ``<prefix>:model:announce`` and appends it to
the history (``<prefix>:model:history``). Replicas (:func:`follow`) load a generation newer
than theirs and never an older one, so a slow load of an old version cannot land after a newer
one. Only the folder layout knows about files: another storage (an object store) would
implement ``store``/``files`` alike.

An *experiment* serves several versions at once, each to its share of the users (its arms):
``<prefix>:model:experiment`` holds it as JSON (its id, arms and split), announced on the same
channel; every process loads the arms' versions and routes a user to the same arm by a stable
hash of the experiment's id and the user's id (:meth:`Experiment.arm_of`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import redis
import redis.asyncio as aioredis

from service.files import sync, sync_tree

log = logging.getLogger("visrec.registry")
CHECKPOINT = "checkpoint.pt"
FEATURES = "features"
VERSION_CHARS = 12  # of the checkpoint's sha256: a version's name, and the one answers give
TABLES = "serving"  # service.model.tables.TABLES (not imported: this module stays light)


class RegistryError(ValueError):
    """A version that does not exist, nothing to roll back to, ..."""


@dataclass(frozen=True, order=True)
class Current:
    generation: int
    version: str

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Current | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        generation, version = text.split(" ", 1)
        return cls(int(generation), version)

    def __str__(self) -> str:
        return f"{self.generation} {self.version}"


ARM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Experiment:
    id: str  # drawn at start: the hash that assigns users to arms, and the arms' labels
    arms: tuple[tuple[str, str], ...]  # (name, version); the first is the control
    split: tuple[int, ...]  # percent of the users per arm, summing to 100
    started: float  # seconds since the epoch

    def arm_of(self, user_id: str | None) -> str:
        """The arm a user is in, the same in every process for as long as the experiment
        runs; an anonymous history (no user) gets the control."""
        if user_id is None:
            return self.arms[0][0]
        digest = hashlib.sha256(f"{self.id}:{user_id}".encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") % 100
        for (name, _), upper in zip(self.arms, accumulate(self.split), strict=True):
            if bucket < upper:
                return name
        raise AssertionError("a split sums to 100")

    def label(self, arm: str) -> str:
        """How answers, feedback and metrics name an arm: ``<experiment id>/<arm>``."""
        return f"{self.id}/{arm}"

    def version(self, arm: str) -> str:
        return dict(self.arms)[arm]

    def dumps(self) -> str:
        return json.dumps(
            {"id": self.id, "arms": self.arms, "split": self.split, "started": self.started}
        )

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Experiment | None:
        if raw is None:
            return None
        data = json.loads(raw)
        arms = tuple((str(n), str(v)) for n, v in data["arms"])
        return cls(data["id"], arms, tuple(data["split"]), float(data["started"]))


class Registry:
    def __init__(self, root: Path, redis_url: str, prefix: str = "visrec") -> None:
        self.root = Path(root)
        self.redis_url = redis_url
        self.keys = _Keys(prefix)

    # --- files -------------------------------------------------------------------------------
    def store(self, checkpoint: Path, features: Path) -> str:
        """Copy a checkpoint and its features in as a version (a no-op when it is there)."""
        version = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:VERSION_CHARS]
        target = self.root / version
        if target.is_dir():
            return version
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f".{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        shutil.copy2(checkpoint, partial / CHECKPOINT)
        # not the serving tables of other checkpoints on those features (GBs at 1M items)
        shutil.copytree(features, partial / FEATURES, ignore=shutil.ignore_patterns(TABLES))
        sync_tree(partial)  # on the disk before it is there: a version is whole or not at all,
        partial.rename(target)  # after a power loss too
        sync(self.root)
        return version

    def files(self, version: str) -> tuple[Path, Path]:
        """(checkpoint, features folder) of a version."""
        checkpoint = self.root / version / CHECKPOINT
        if not checkpoint.is_file():
            raise RegistryError(f"no version {version!r} in {self.root}")
        return checkpoint, self.root / version / FEATURES

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CHECKPOINT).is_file())

    # --- which one serves ---------------------------------------------------------------------
    def publish(self, checkpoint: Path, features: Path) -> Current:
        """Store a version and make it the current one."""
        return self.make_current(self.store(checkpoint, features))

    def make_current(self, version: str) -> Current:
        self.files(version)  # it must exist
        with redis.Redis.from_url(self.redis_url) as client:
            current = Current(int(client.incr(self.keys.generation)), version)
            pipe = client.pipeline()
            pipe.set(self.keys.current, str(current))
            pipe.rpush(self.keys.history, str(current))
            pipe.publish(self.keys.announce, str(current))
            pipe.execute()
        log.info("model %s is current (generation %d)", version, current.generation)
        return current

    def rollback(self) -> Current:
        """Make the version that was current before this one current again."""
        with redis.Redis.from_url(self.redis_url) as client:
            history = [Current.parse(h) for h in client.lrange(self.keys.history, 0, -1)]
            now = Current.parse(client.get(self.keys.current))
        older = [h.version for h in history if h is not None and now and h.version != now.version]
        if now is None or not older:
            raise RegistryError("nothing to roll back to: no version was current before this one")
        return self.make_current(older[-1])

    # --- experiments ---------------------------------------------------------------------
    def start_experiment(self, arms: Sequence[tuple[str, str]], split: Sequence[int]) -> Experiment:
        """Serve each arm's version to its share of the users (the first arm: the control),
        replacing any experiment that runs."""
        names = [n for n, _ in arms]
        if len(arms) < 2 or len(set(names)) != len(names):
            raise RegistryError("an experiment needs two or more arms with distinct names")
        if bad := [n for n in names if not ARM_NAME.match(n)]:
            raise RegistryError(f"arm names are 1-32 of A-Z a-z 0-9 _ -: {', '.join(bad)}")
        if len(split) != len(arms) or sum(split) != 100 or min(split) <= 0:
            raise RegistryError(
                f"the split gives each of the {len(arms)} arms a positive percent, summing to "
                f"100: got {'/'.join(map(str, split))}"
            )
        for _, version in arms:
            self.files(version)  # it must exist
        experiment = Experiment(secrets.token_hex(4), tuple(arms), tuple(split), time.time())
        self._announce_experiment(experiment)
        return experiment

    def experiment(self) -> Experiment | None:
        with redis.Redis.from_url(self.redis_url) as client:
            return Experiment.parse(client.get(self.keys.experiment))

    def stop_experiment(self) -> Experiment:
        """Stop the running experiment: every user gets the current version again."""
        running = self.experiment()
        if running is None:
            raise RegistryError("no experiment runs")
        self._announce_experiment(None)
        return running

    def promote(self, arm: str) -> Current:
        """Make an arm's version current, then stop the experiment."""
        running = self.experiment()
        if running is None or arm not in dict(running.arms):
            raise RegistryError(f"no running experiment has an arm {arm!r}")
        current = self.make_current(running.version(arm))
        self._announce_experiment(None)
        return current

    def _announce_experiment(self, experiment: Experiment | None) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            pipe = client.pipeline()
            if experiment is None:
                pipe.delete(self.keys.experiment)
            else:
                pipe.set(self.keys.experiment, experiment.dumps())
            pipe.publish(self.keys.announce, "experiment")
            pipe.execute()

    def current(self) -> Current | None:
        with redis.Redis.from_url(self.redis_url) as client:
            return Current.parse(client.get(self.keys.current))

    def current_files(self) -> tuple[Current, Path, Path] | None:
        """The current version and its (checkpoint, features folder); None before a publish."""
        current = self.current()
        return None if current is None else (current, *self.files(current.version))


@dataclass(frozen=True)
class _Keys:
    prefix: str

    @property
    def current(self) -> str:
        return f"{self.prefix}:model:current"

    @property
    def generation(self) -> str:
        return f"{self.prefix}:model:generation"

    @property
    def history(self) -> str:
        return f"{self.prefix}:model:history"

    @property
    def experiment(self) -> str:
        return f"{self.prefix}:model:experiment"

    @property
    def announce(self) -> str:
        return f"{self.prefix}:model:announce"


async def follow(
    registry: Registry,
    load: Callable[[Path, Path], Awaitable[object]],
    *,
    serving: Current | None,
    poll_s: float,
    run: RunExperiment | None = None,
) -> None:
    """For as long as it runs: whenever a generation newer than ``serving`` is current, build
    and swap it in with ``load`` (which keeps the old engine when the new one fails); whenever
    another experiment runs (or none any more), hand it and its arms' files to ``run``. Woken
    by the announcement, and every ``poll_s`` seconds in case one was missed (Redis restarted,
    the subscription dropped)."""
    client = aioredis.Redis.from_url(registry.redis_url)
    pubsub = client.pubsub()
    running: str | None = None  # the id of the experiment handed to ``run``
    try:
        while True:
            current = serving
            try:
                if not pubsub.subscribed:
                    await pubsub.subscribe(registry.keys.announce)
                current = Current.parse(await client.get(registry.keys.current))
                if current is not None and (serving is None or current > serving):
                    await load(*registry.files(current.version))
                    serving = current
                if run is not None:
                    running = await _follow_experiment(client, registry, run, running)
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
            except (redis.RedisError, OSError) as err:
                log.warning("model registry not reachable (%s); trying again", err)
                await asyncio.sleep(poll_s)
            except Exception as err:  # a version that cannot load: keep serving, say why
                log.error("model %s could not be loaded: %s", current, err)
                serving = current  # do not retry the same generation in a loop
    finally:
        await pubsub.aclose()
        await client.aclose()


RunExperiment = Callable[[Experiment | None, dict[str, tuple[Path, Path]]], Awaitable[object]]


async def _follow_experiment(
    client: aioredis.Redis, registry: Registry, run: RunExperiment, running: str | None
) -> str | None:
    """Hand the stored experiment to ``run`` if it is not the one running; its id. An arm
    that cannot load is logged and not tried again until another experiment starts."""
    experiment = Experiment.parse(await client.get(registry.keys.experiment))
    found = experiment.id if experiment else None
    if found == running:
        return running
    try:
        files = {a: registry.files(v) for a, v in experiment.arms} if experiment else {}
        await run(experiment, files)
    except Exception as err:
        log.error("experiment %s could not start here: %s", found, err)
    return found
