"""A paced load: requests started on time, whether or not earlier ones were answered."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from typing import Any


async def paced(
    rate: float, stop: asyncio.Event, request: Callable[[int], Coroutine[Any, Any, None]]
) -> None:
    """Start ``request(n)`` for n = 0, 1, ... at ``rate`` a second until ``stop`` is set (an
    open loop: a slow answer does not delay the next request), then wait for those in flight."""
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    for n in itertools.count():
        if stop.is_set():
            break
        task = asyncio.create_task(request(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
    await asyncio.gather(*tasks)
