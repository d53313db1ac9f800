"""Micro-batching: concurrent requests share one model call.

One attention forward and one FAISS search for 32 users cost little more than for one. A batch
is every request that queued while the previous call ran, plus those arriving within
``window_s`` of its first request (0: no waiting, only what has queued). The batch function runs
on a single worker thread, never on the event loop, one batch at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Generic, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")


class MicroBatcher(Generic[Q, R]):
    def __init__(
        self,
        fn: Callable[[Sequence[Q]], Sequence[R]],
        *,
        window_s: float = 0.0,
        max_batch: int = 256,
    ) -> None:
        self._fn = fn
        self._window_s = window_s
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Q, asyncio.Future[R]]] = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MicroBatcher[Q, R]:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=False)  # never block the loop: a running batch ends alone

    async def submit(self, query: Q) -> R:
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((query, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._take_waiting(batch)  # requests that queued while the last batch ran
            if self._window_s > 0:
                await self._wait_for_more(batch)
            await self._call(loop, batch)

    async def _wait_for_more(self, batch: list[tuple[Q, asyncio.Future[R]]]) -> None:
        """Add the requests that arrive within the window. ``asyncio.timeout``, not
        ``wait_for``: on Python 3.11 ``wait_for`` returns a result that arrives as its task
        is cancelled and drops the cancellation, which can leave a stopping app waiting."""
        with suppress(TimeoutError):
            async with asyncio.timeout(self._window_s):
                while len(batch) < self._max_batch:
                    batch.append(await self._queue.get())
                    self._take_waiting(batch)

    def _take_waiting(self, batch: list[tuple[Q, asyncio.Future[R]]]) -> None:
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _call(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Q, asyncio.Future[R]]]
    ) -> None:
        queries = [q for q, _ in batch]
        try:
            results = await loop.run_in_executor(self._worker, self._fn, queries)
        except Exception as err:  # every caller of the batch gets the error, none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
