"""Service settings, read from the environment (``VISREC_*``) by entry points only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Keys that appear in examples and templates; a real deployment never uses them.
PLACEHOLDER_KEYS = frozenset({"changeme", "change-me", "secret", "password", "placeholder", "dev"})
MIN_KEY_LENGTH = 16
MIN_KEY_DISTINCT = 10  # a 16-character key of one repeated character is no secret


def weak_key(key: str) -> bool:
    """A placeholder, or too short or too repetitive to be a random secret."""
    return (
        key.lower() in PLACEHOLDER_KEYS
        or len(key) < MIN_KEY_LENGTH
        or len(set(key)) < MIN_KEY_DISTINCT
    )


def key_list(text: str) -> tuple[str, ...]:
    """Comma-separated keys, blanks dropped."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


class RegistrySettings(BaseSettings):
    """Where profiles and the model registry live: what the service and `visrec publish` (or
    `rollback`) read alike."""

    # An empty variable is an unset one: compose files pass VISREC_DATA as ${DATA:+/data}, empty
    # when there is no dataset, which must mean the default (the synthetic world), not "."
    model_config = SettingsConfigDict(env_prefix="VISREC_", env_ignore_empty=True)

    # None: an in-process profile store; redis://host:port/db for one Redis, or
    # redis+cluster://host:port[,host:port...] for a Redis Cluster (one or more of its nodes)
    redis_url: str | None = None
    redis_prefix: str = "visrec"
    # A model registry (service/registry.py): the folder of versions, with the current one
    # named in Redis (needs redis_url).
    registry: Path | None = None


class Settings(RegistrySettings):
    """Every setting of a serving process, from ``VISREC_*`` variables."""

    # "production" refuses to start without real keys; "development" runs without any.
    environment: Literal["development", "production"] = "production"
    api_keys: str = ""  # comma-separated keys that may write (POST /interactions)
    admin_keys: str = ""  # comma-separated keys for admin calls (and writes)
    auth_reads: bool = False  # whether reads (/recommend, /explain, the page) need a key too
    rate_limit_per_s: Annotated[float, Field(ge=0)] = 1000.0  # per key or client; 0 = off
    rate_burst: Annotated[int, Field(ge=1)] = 2000
    # Failed authentications per client address: a token bucket of its own; when it is empty
    # the address's wrong keys get 429 (its valid keys still work). 0 = off.
    auth_failures_per_s: Annotated[float, Field(ge=0)] = 1.0
    auth_failure_burst: Annotated[int, Field(ge=1)] = 20
    # Proxies (IPs or CIDR networks, comma-separated) whose X-Forwarded-For names the client;
    # from any other peer the header is ignored. Empty: the peer is the client.
    trusted_proxies: str = ""
    # Slow clients (slowloris): a request's headers must arrive within this many seconds, and
    # one address may hold this many connections open (trusted proxies exempt).
    header_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_connections_per_address: Annotated[int, Field(ge=1)] = 100
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576

    checkpoint: Path
    features: Path
    # The backbone weights file POST /items reads images with, when the features were not
    # extracted with the backbone's shipped weights (`visrec features --weights`). None: the
    # features folder's own backbone.pth when it has one (a fitted backbone), else the shipped.
    backbone_weights: Path | None = None
    # Folders (comma-separated) that POST /admin/reload may load files from, besides the
    # serving checkpoint's and feature folder's own parent folders.
    model_dirs: str = ""
    device: str = "auto"
    # Where visrec-serve listens, from HOST and PORT, the names platforms set. Not VISREC_PORT:
    # Kubernetes gives every pod <SERVICE>_PORT=tcp://ip:port for each Service, so a Service
    # named "visrec" would set it to something that is no port.
    host: Annotated[str, Field(validation_alias="HOST")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, validation_alias="PORT")] = 8000
    # visrec-serve's processes on one port (--workers); more than one needs redis_url
    workers: Annotated[int, Field(ge=1)] = 1
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    # How long a request waits for others to share its model call. Requests that queue while
    # a call runs share the next one anyway; a 1.5 ms window added 1.6 ms at one connection and
    # gave no clear gain under load (benchmarks/serve_load.py, 2 cores), hence 0.
    batch_window_ms: Annotated[float, Field(ge=0, le=50)] = 0.0
    cpu_threads: Annotated[int, Field(ge=1)] = 1  # torch threads for the model on the CPU
    # Share of requests written to the access log (uvicorn's line per request): 0 (the default)
    # writes none, 1 every one, 0.01 every 100th. /metrics counts requests, statuses and
    # latencies either way; benchmarks/access_log.py measures what the lines cost.
    access_log: Annotated[float, Field(ge=0, le=1)] = 0.0
    # The dataset folder whose items.csv titles and images the explanation page shows; without
    # one the page shows item ids instead of images.
    data: Path | None = None
    # Faults of the Redis store: the most a request waits for Redis (a pooled connection,
    # connecting, the reply). A read past it answers from the profile cache, marked degraded;
    # a write past it answers 503 with Retry-After. Only the time the event loop was free to
    # read the reply counts (service/store/redis/deadline.py), so a saturated server does not time
    # out a healthy Redis; writes, whose refusal costs the client a retry, get longer.
    redis_timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    redis_write_timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 250.0
    # Connections to Redis per process. Waiting for one counts against a request's deadline,
    # so keep it above the requests in flight at peak: with 50, 200 writers on 2 cores had
    # 1.4% of writes refused against a healthy Redis; with 200, none.
    redis_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 200
    # Replicas that must have a write before POST /interactions acknowledges it (Redis WAIT;
    # on a Redis Cluster, the replicas of the primary that holds the user): with 1, a failover
    # keeps every acknowledged write. 0: acknowledged once the primary applied it.
    redis_wait_replicas: Annotated[int, Field(ge=0, le=16)] = 0
    redis_wait_timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 200
    # Profiles of the users this process read or wrote most recently, for reads while Redis
    # cannot answer: ~100-300 bytes each (stored encoded), so 50,000 take ~20 MB.
    profile_cache_size: Annotated[int, Field(ge=0)] = 50_000
    # With Redis: the last this many events this process acknowledged, kept in memory to write
    # back when Redis loses its data (FLUSHALL, a restart without it; service/store/journal.py);
    # ~270 bytes each with an 18-character event id, so 100,000 take ~25 MB. Older events, and
    # those of a process that died, are not covered.
    journal_events: Annotated[int, Field(ge=0)] = 100_000
    # Items added while serving (POST /items) are kept in Redis when there is one, else in
    # this folder (None: in this process only, gone with it). Replicas look for items added
    # elsewhere every items_sync_s seconds (0: only at start-up).
    items_dir: Path | None = None
    # Each process serves the registry's current version (see RegistrySettings) and follows
    # every publish and rollback, on the announcement or, missed, within registry_poll_s s.
    registry_poll_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    items_sync_s: Annotated[float, Field(ge=0)] = 2.0
    # Each /recommend answer is kept this long under its request_id for POST /feedback (in
    # Redis when configured: 360 bytes for an answer of 20 items; 0: feedback off).
    feedback_window_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 3600.0
    max_image_bytes: Annotated[int, Field(ge=1024)] = 10 * 1_048_576
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    # The in-process store (no Redis) keeps this many users, read or written most recently;
    # ~700-900 bytes each with ~100-item histories, so a million take ~0.9 GB.
    memory_store_max_users: Annotated[int, Field(ge=1)] = 1_000_000

    @model_validator(mode="after")
    def _registry_needs_redis(self) -> Settings:
        if self.registry is not None and not self.redis_url:
            raise ValueError(
                "a model registry (VISREC_REGISTRY) names its current version in Redis: set "
                "VISREC_REDIS_URL as well"
            )
        if self.registry is not None and (self.redis_url or "").startswith("redis+cluster://"):
            raise ValueError(
                "the model registry does not run on a Redis Cluster yet (profiles and items "
                "do): use one Redis with a model registry, or VISREC_REGISTRY unset"
            )
        return self

    @model_validator(mode="after")
    def _no_usable_default_secrets(self) -> Settings:
        if self.environment == "development":
            return self
        writers = key_list(self.api_keys) + key_list(self.admin_keys)
        if not writers:
            raise ValueError(
                "refusing to start in production without API keys: set VISREC_API_KEYS (and "
                "VISREC_ADMIN_KEYS), or VISREC_ENVIRONMENT=development for a local run"
            )
        weak = [k for k in writers if weak_key(k)]
        if weak:
            raise ValueError(
                f"refusing to start in production with {len(weak)} placeholder, short or "
                f"repetitive API key(s) (a key needs at least {MIN_KEY_LENGTH} characters, "
                f"{MIN_KEY_DISTINCT} of them distinct); use random keys, e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return self

    def reload_roots(self) -> tuple[Path, ...]:
        """The folders POST /admin/reload may read from."""
        extra = tuple(Path(d) for d in key_list(self.model_dirs))
        return (self.checkpoint.parent, self.features.parent, *extra)
