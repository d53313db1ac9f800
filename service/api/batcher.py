"""Micro-batching: requests arriving within a short window share one model call.

One attention forward and one FAISS search for 32 users cost little more than for one, so
concurrent requests wait up to ``window_s`` for company. The batch function runs on a single
worker thread, never on the event loop, and calls into torch/FAISS one batch at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")


class MicroBatcher(Generic[Q, R]):
    def __init__(
        self,
        fn: Callable[[Sequence[Q]], Sequence[R]],
        *,
        window_s: float = 0.0015,
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
        self._worker.shutdown(wait=True)

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
            deadline = loop.time() + self._window_s
            while len(batch) < self._max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            await self._call(loop, batch)

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
