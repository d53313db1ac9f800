"""Deadlines for calls to Redis that count the time Redis had to answer, not the time this
process's event loop was too busy to read the answer.

A plain ``asyncio.timeout`` runs on the event loop. When the loop is saturated (a server at
capacity parsing and validating requests), a reply that Redis sent within a millisecond waits
in the socket until the loop gets to it, and the timer that expires meanwhile cancels the call:
with a healthy Redis, 50 concurrent writers of 20-event batches on 2 cores had 6 writes in
6,400 refused, 100-event batches 55%, and 200 writers 73%. Worse, such a write was applied
(Redis had run it) yet answered 503.

:class:`LoopLag` measures how far behind the loop runs: a probe asks to wake every
``period_s`` and adds up how late it wakes. :func:`deadline` lets a call run until it has had
``seconds`` of *responsive* loop time: wall time minus the loop's lateness over the same span.
On an idle loop that is the wall clock; when Redis hangs, nothing keeps the loop busy, so the
call still ends after about ``seconds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

PROBE_PERIOD_S = 0.005


class LoopLag:
    """Seconds the running event loop has fallen behind since :meth:`start`, summed."""

    def __init__(self, period_s: float = PROBE_PERIOD_S) -> None:
        self.period_s = period_s
        self._late_s = 0.0  # lateness of the probe's completed wake-ups
        self._next_wake = 0.0  # when the probe's pending wake-up is due (loop time)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def running_here(self) -> bool:
        """Whether the probe runs on the current event loop."""
        return self._task is not None and not self._task.done() and self._loop is _loop()

    def start(self) -> None:
        """Start the probe on the running loop (again, if it ran on another one)."""
        if self.running_here():
            return
        self._loop = asyncio.get_running_loop()
        self._next_wake = self._loop.time() + self.period_s
        self._task = self._loop.create_task(self._probe(), name="loop-lag-probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done() and self._loop is _loop():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    def behind(self, now: float) -> float:
        """Lateness so far, including that of a wake-up overdue at ``now`` (loop time): the
        probe's own callback may be queued behind the very timer that asks."""
        return self._late_s + max(0.0, now - self._next_wake)

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period_s)
            now = loop.time()
            self._late_s += max(0.0, now - self._next_wake)
            self._next_wake = now + self.period_s


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@asynccontextmanager
async def deadline(seconds: float | None, lag: LoopLag) -> AsyncIterator[None]:
    """Like ``asyncio.timeout(seconds)`` (TimeoutError when it expires; None: no deadline), but
    only the loop's responsive time counts (see the module docstring)."""
    if seconds is None:
        yield
        return
    lag.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    behind_at_start = lag.behind(start)
    async with asyncio.timeout(None) as timeout:
        handle: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal handle
            now = loop.time()
            used = (now - start) - (lag.behind(now) - behind_at_start)
            if used >= seconds:
                timeout.reschedule(now)  # expires at once: cancels the call
            else:
                handle = loop.call_at(now + seconds - used, check)

        handle = loop.call_at(start + seconds, check)
        try:
            yield
        finally:
            handle.cancel()
