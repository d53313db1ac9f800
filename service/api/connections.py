"""Slow clients (slowloris): a bound on the time to send request headers, and on the
connections one address may hold open.

uvicorn has neither: a connection that sends half a request line and then nothing stays open
for good. ~20,000 such connections from two clients used up the process's file descriptors, and
every new request then got an empty reply. :func:`guarded_http` makes uvicorn's HTTP protocol
class (httptools) with both bounds:

- a connection must finish a request's headers within ``header_timeout_s`` of opening, or of
  its first byte for a later request on a kept-alive connection (idle time between requests is
  uvicorn's keep-alive timeout); otherwise it is closed;
- one client address holds at most ``per_address`` connections; more are closed at once.
  Trusted proxies are exempt: every client behind them shares their address.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def guarded_http(
    *, header_timeout_s: float, per_address: int, exempt: Callable[[str], bool] = lambda _: False
) -> type[asyncio.Protocol]:
    """An HTTP protocol class for ``uvicorn.Config(http=...)`` with the bounds above."""
    if header_timeout_s <= 0 or per_address < 1:
        raise ValueError("the header timeout must be positive and per_address at least 1")
    open_per_address: Counter[str] = Counter()  # one server per class made here

    class GuardedHttp(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else ""
            if not exempt(host):
                if open_per_address[host] >= per_address:
                    transport.close()  # connection_lost follows, and counts nothing
                    return
                open_per_address[host] += 1
                self._counted = host
            self._start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            if self._counted is not None:
                open_per_address[self._counted] -= 1
                if open_per_address[self._counted] <= 0:
                    del open_per_address[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # a later request on a kept-alive connection
                self._start_header_timer()

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            super().on_headers_complete()

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(header_timeout_s, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedHttp
