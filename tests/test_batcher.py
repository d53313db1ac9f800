"""Micro-batching: concurrent requests share calls, answers go to the right caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from service.api.batcher import MicroBatcher


def test_concurrent_requests_share_a_call_and_get_their_own_answer() -> None:
    calls: list[list[int]] = []
    threads: set[str] = set()

    def square(xs: Sequence[int]) -> list[int]:
        calls.append(list(xs))
        threads.add(threading.current_thread().name)
        return [x * x for x in xs]

    async def main() -> list[int]:
        async with MicroBatcher(square, window_s=0.05) as batcher:
            return await asyncio.gather(*(batcher.submit(x) for x in range(40)))

    assert asyncio.run(main()) == [x * x for x in range(40)]
    assert len(calls) < 40  # batched
    assert sorted(x for call in calls for x in call) == list(range(40))
    assert threading.main_thread().name not in threads  # never on the event loop's thread


def test_max_batch_is_respected() -> None:
    sizes: list[int] = []

    def ident(xs: Sequence[int]) -> list[int]:
        sizes.append(len(xs))
        return list(xs)

    async def main() -> None:
        async with MicroBatcher(ident, window_s=0.05, max_batch=8) as batcher:
            await asyncio.gather(*(batcher.submit(x) for x in range(30)))

    asyncio.run(main())
    assert max(sizes) <= 8
    assert sum(sizes) == 30


def test_an_error_reaches_every_caller_of_the_batch_and_the_next_batch_works() -> None:
    def fail_on_seven(xs: Sequence[int]) -> list[int]:
        if 7 in xs:
            raise ValueError("seven")
        return list(xs)

    async def main() -> tuple[list[object], int]:
        async with MicroBatcher(fail_on_seven, window_s=0.05) as batcher:
            results = await asyncio.gather(
                *(batcher.submit(x) for x in (6, 7, 8)), return_exceptions=True
            )
            return results, await batcher.submit(9)

    results, after = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in results)
    assert after == 9


def test_submitting_to_a_stopped_batcher_fails_clearly() -> None:
    async def main() -> None:
        await MicroBatcher(lambda xs: list(xs)).submit(1)

    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(main())


def test_requests_that_arrive_during_a_call_form_the_next_batch() -> None:
    calls: list[list[int]] = []
    started = threading.Event()

    def slow(xs: Sequence[int]) -> list[int]:
        calls.append(list(xs))
        started.set()
        threading.Event().wait(0.05)  # the model is busy
        return list(xs)

    async def main() -> None:
        async with MicroBatcher(slow, window_s=0.0) as batcher:
            first = asyncio.create_task(batcher.submit(0))
            await asyncio.to_thread(started.wait)
            await asyncio.gather(first, *(batcher.submit(x) for x in range(1, 21)))

    asyncio.run(main())
    assert calls == [[0], list(range(1, 21))]  # no window, yet one call for the queued twenty


@pytest.mark.parametrize("turns", range(6))
def test_a_batcher_stops_when_a_request_arrives_as_it_is_cancelled(turns: int) -> None:
    """On Python 3.11 ``asyncio.wait_for`` kept a request that arrived in the same turn of the
    loop as the stop's cancellation and dropped the cancellation: the batch went on waiting
    for more, and the app's stop waited for it for good."""

    async def main() -> None:
        batcher = MicroBatcher(list, window_s=60.0)  # a batch waits long for company
        await batcher.__aenter__()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the batch has its first request and waits for more
        second = asyncio.ensure_future(batcher.submit(2))
        for _ in range(turns):  # the second is put, then handed over, then read...
            await asyncio.sleep(0)
        async with asyncio.timeout(10):  # not a speed limit: without it a bug hangs the run
            await batcher.__aexit__(None, None, None)
        for request in (first, second):
            request.cancel()

    asyncio.run(main())
