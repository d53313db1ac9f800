"""``visrec-serve``: serve a dataset folder, or with none a built-in synthetic world.

Whatever is missing is made first (features, then a trained checkpoint), so on a fresh machine
one command goes from nothing to a running service.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.workers import COULD_NOT_START  # the standard library only: cheap

# Only what parsing the arguments needs is imported here: torch and the training stack take
# seconds, and `visrec-serve --help` (or a refused start) must not wait for them.
if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from service.config import Settings

log = logging.getLogger("visrec.serve")

ENVIRONMENT = """environment (the service's settings, see service/config.py):
  VISREC_ENVIRONMENT        production (default: refuses weak or missing keys) or development
  VISREC_API_KEYS           comma-separated keys that may write; VISREC_ADMIN_KEYS: admin too
  VISREC_AUTH_READS         true: reads need a key as well
  VISREC_REDIS_URL          redis://host:port/db for shared profiles (default: in-process)
  VISREC_TRUSTED_PROXIES    proxies whose X-Forwarded-For is believed (IPs or CIDRs)
  VISREC_RATE_LIMIT_PER_S, VISREC_RATE_BURST, VISREC_MAX_BODY_BYTES, VISREC_INDEX,
  VISREC_BATCH_WINDOW_MS, VISREC_CPU_THREADS, VISREC_REDIS_TIMEOUT_MS, VISREC_MODEL_DIRS, ...
  VISREC_ACCESS_LOG         share of requests logged, one line each (default 0: none)
  VISREC_DATA, VISREC_DEVICE, VISREC_WORKERS, HOST, PORT   defaults of the arguments above
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visrec-serve",
        description=__doc__,
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "data",
        type=Path,
        nargs="?",
        help="dataset folder (default: $VISREC_DATA, else the synthetic world)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs"),
        help="where features and the checkpoint are built and found (default: runs)",
    )
    parser.add_argument("--host", help="address to listen on (default: $HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: $PORT, else 8000)")
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or auto: the GPU when there is one (default: $VISREC_DEVICE, "
        "else auto)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="processes serving one port; the model is loaded once and shared (default: "
        "$VISREC_WORKERS, else 1). More than one needs VISREC_REDIS_URL: each process would "
        "otherwise keep its own profiles",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="training epochs when there is no checkpoint yet (default: the training "
        "default, 40, with early stopping); an interrupted training resumes where it stopped",
    )
    parser.add_argument(
        "--load-profiles",
        action="store_true",
        help="merge the dataset's histories into Redis, once per data set: the first process "
        "started with them does (and merges them back if Redis loses its data); live events "
        "are kept (the in-process store always starts from them)",
    )
    return parser


def environment() -> Settings | str:
    """The environment's settings (``VISREC_*``; the model's paths are filled in later), or
    what is wrong with them, in one line."""
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings(checkpoint=Path(), features=Path())
    except ValidationError as err:
        return "; ".join(_one_line(e) for e in err.errors())


def _one_line(error: ErrorDetails) -> str:
    """A pydantic error as an operator reads it: the setting, then what is wrong."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error.get("loc", ())).upper()
    if where and where not in UNPREFIXED:
        where = f"VISREC_{where}"
    return f"{where}: {message}" if where else message


UNPREFIXED = ("HOST", "PORT")  # settings read from the names platforms set


def main() -> None:
    cli = parser()
    args = cli.parse_args()
    # Fail fast on the environment's settings (e.g. no API keys in production) before what may
    # be minutes of building, in one line rather than pydantic's dump.
    env = environment()
    if isinstance(env, str):
        print(f"visrec-serve: {env}", file=sys.stderr)
        raise SystemExit(2)
    args.data = args.data or env.data
    args.device = args.device or env.device
    args.host = args.host or env.host
    args.port = env.port if args.port is None else args.port
    args.workers = env.workers if args.workers is None else args.workers
    if args.epochs is not None and args.epochs < 1:
        cli.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.workers < 1:
        cli.error(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and not env.redis_url:
        cli.error(
            f"--workers {args.workers} needs VISREC_REDIS_URL: with the in-process profile "
            "store every worker would keep its own profiles, and they would diverge"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(args, env)


def serve(args: argparse.Namespace, env: Settings) -> None:
    """Serve what ``args`` (the command line, its defaults filled from ``env``) and ``env``
    (the environment's settings) say."""
    from service.api.app import create_app
    from service.engine import registry_of
    from service.offline.bootstrap import dataset_of, histories, history_times, prepare_serving
    from service.runtime import keep_freed_memory, pick_device

    keep_freed_memory()
    device = pick_device(args.device)
    if args.workers > 1 and device.type == "cuda":
        print("visrec-serve: --workers > 1 is for the CPU (CUDA does not survive a fork): run "
              "one process per GPU, as replicas", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    registry = registry_of(env)  # its current version, when there is one
    registered = registry.current_files() if registry else None
    if registered is None:
        dataset, features, checkpoint = prepare_serving(
            args.data, args.work_dir, device, args.epochs
        )
    else:  # the registry's current version: nothing to build, the dataset is for the page
        _, checkpoint, features = registered
        dataset = dataset_of(args.data, args.work_dir)
    settings = env.model_copy(
        update={
            "checkpoint": checkpoint,
            "features": features,
            "device": str(device),
            "data": dataset.root,
        }
    )
    if settings.items_dir is None:  # without Redis, added items live next to the checkpoint
        settings = settings.model_copy(update={"items_dir": checkpoint.parent / "added-items"})
    # The in-process store starts from the dataset's histories; a Redis store keeps its own.
    load = args.load_profiles or not settings.redis_url
    profiles = histories(dataset) if load else None
    times = history_times(dataset) if load else None
    if args.workers == 1:
        app = create_app(settings, profiles=profiles, profile_times=times)
        run_server(app, settings, host=args.host, port=args.port)
        return
    from service.engine import preload
    from service.workers import serve_workers

    loaded = preload(settings)
    status = serve_workers(
        # the first worker loads the profiles into Redis; the others find them there
        lambda n: create_app(
            settings,
            profiles=profiles if n == 0 else None,
            profile_times=times if n == 0 else None,
            preloaded=loaded,
        ),
        lambda app, sock: run_server(app, settings, sockets=[sock]),
        host=args.host,
        port=args.port,
        workers=args.workers,
    )
    raise SystemExit(status)


def run_server(
    app: Any,
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    sockets: list[socket.socket] | None = None,
) -> None:
    """uvicorn as `visrec-serve` runs it (benchmarks run the app through this too), on
    ``host:port`` or on already bound ``sockets``."""
    import uvicorn

    from service.api.connections import guarded_http
    from service.api.security import Proxies

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # X-Forwarded-For is the app's business (VISREC_TRUSTED_PROXIES): uvicorn's own
        # handling believes it from any local peer.
        proxy_headers=False,
        http=guarded_http(
            header_timeout_s=settings.header_timeout_s,
            per_address=settings.max_connections_per_address,
            exempt=Proxies.parse(settings.trusted_proxies).trusts,
        ),
        access_log=settings.access_log > 0,
        log_config=log_config(settings.access_log),
    )
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:  # as uvicorn.run: the lifespan failed, and said why
        raise SystemExit(COULD_NOT_START)


def log_config(access_share: float) -> dict[str, Any]:
    """uvicorn's logging, its access log thinned to every ``1 / access_share``-th request."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    if 0 < access_share < 1:
        every = round(1 / access_share)
        config["filters"] = {"sample": {"()": EveryNth, "every": every}}
        config["handlers"]["access"]["filters"] = ["sample"]  # handlers are made anew
    return config


class EveryNth(logging.Filter):
    """Passes one record in ``every``."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.seen = itertools.count()

    def filter(self, record: logging.LogRecord) -> bool:
        return next(self.seen) % self.every == 0


if __name__ == "__main__":
    main()
