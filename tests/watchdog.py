"""What a stuck run says before it ends: CI keeps only the end of a run's output, and the
asyncio tasks of an app's loop are where a stuck test waits, which a thread dump does not show.

- A test that has run ``STUCK_AFTER_S`` prints, in a line each, where every thread and every
  task of a running event loop waits, then ends the run (before pytest-timeout's own, longer
  dump would push those lines out of what CI keeps).
- A stop of an app that had to leave a task behind (``service.api.lifespan.ended``) is listed
  at the end of the run, which passes: the stop ended as designed, but its cause is a bug.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

# pytest-timeout (pyproject.toml) is the backstop, at 600 s
STUCK_AFTER_S = float(os.environ.get("VISREC_TEST_STUCK_AFTER_S", "540"))
_stops_left_behind: list[str] = []
_config: list[pytest.Config] = []


class _StopsLeftBehind(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "into the stop" in record.getMessage():
            test = os.environ.get("PYTEST_CURRENT_TEST", "outside a test")
            _stops_left_behind.append(f"{test}: {record.getMessage()[:1500]}")


def pytest_configure(config: pytest.Config) -> None:
    _config.append(config)
    logging.getLogger("visrec.api").addHandler(_StopsLeftBehind(logging.ERROR))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _stops_left_behind:
        terminalreporter.section("stops that left a task behind")
        for message in _stops_left_behind:
            terminalreporter.write_line(message)


@pytest.fixture(autouse=True)
def _watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    timer = threading.Timer(STUCK_AFTER_S, _where_stuck, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


def _where_stuck(test: str) -> None:
    lines = [f"+++ {test} has run {STUCK_AFTER_S:.0f} s: where each thread and task waits"]
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        lines.append(f"thread {names.get(ident, ident)}: {' > '.join(_frames(frame))}")
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    for loop in (loop for loop in loops if loop.is_running()):
        for task in asyncio.all_tasks(loop):
            lines.append(f"task {task.get_name()}: {' > '.join(_awaits(task.get_coro()))}")
    capture = _config[0].pluginmanager.getplugin("capturemanager")
    if capture is not None:  # as a debugger does: the run's own stderr, not the test's
        capture.suspend_global_capture(in_=False)
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    os._exit(3)


def _place(frame: FrameType) -> str:
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"


def _frames(frame: FrameType | None) -> list[str]:
    """The innermost frames of a thread, outermost first."""
    places: list[str] = []
    while frame is not None and len(places) < 8:
        places.append(_place(frame))
        frame = frame.f_back
    return places[::-1]


def _awaits(coro: object) -> list[str]:
    """What a task's coroutine awaits, and what that awaits, down to the innermost."""
    places: list[str] = []
    while coro is not None and len(places) < 12:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            places.append(type(coro).__name__)  # a future, a done coroutine
            break
        places.append(_place(frame))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return places
