"""Pre-forked workers: the model is loaded once, then N processes serve one listening socket.

The parent loads the engine with one torch and one FAISS thread and answers no query, so the
workers inherit no OpenMP thread pool (GNU OpenMP is not fork-safe) and share the model's
pages copy-on-write (``gc.freeze()`` first, so the workers' garbage collector does not write
to the parent's objects). Each worker sets its own threads and answers one query before it
takes requests (its app's lifespan). The parent restarts a worker that dies, stops when one
cannot start, and passes SIGTERM and SIGINT on for a graceful stop.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("visrec.workers")
PR_SET_PDEATHSIG = 1  # prctl(2)
COULD_NOT_START = 3  # exit status when the app's start-up failed (as uvicorn.run's)


def serve_workers(
    make_app: Callable[[int], Any],
    run: Callable[[Any, socket.socket], None],
    *,
    host: str,
    port: int,
    workers: int,
) -> int:
    """Fork ``workers`` processes that each serve ``make_app(number)`` on one shared socket
    with ``run(app, socket)``; returns the exit status once they have all stopped."""
    sock = socket.create_server((host, port), backlog=2048)
    sock.set_inheritable(True)
    gc.freeze()
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False
    parent = os.getpid()

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own
            _stop_with_parent(parent)
            status = 1
            try:
                run(make_app(number), sock)
                status = 0
            except SystemExit as stopped:
                status = stopped.code if isinstance(stopped.code, int) else 1
            finally:
                os._exit(status)  # never back into the parent's code
        children[pid] = number
        log.info("worker %d started (pid %d)", number, pid)

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):  # a signal may come while start() adds one
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for number in range(workers):
        start(number)
    status = 0
    while children:
        pid, code = os.wait()
        number = children.pop(pid, -1)
        if number < 0 or stopping:
            continue
        if os.waitstatus_to_exitcode(code) == COULD_NOT_START:
            log.error("worker %d could not start (pid %d): stopping", number, pid)
            status = 1
            stop(signal.SIGTERM, None)
            continue
        log.warning("worker %d (pid %d) stopped; starting another", number, pid)
        start(number)
    sock.close()
    return status


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this process when the parent dies, even by SIGKILL (Linux), so that no worker
    is left serving the port on its own."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: a killed parent leaves its workers
        return
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)
