"""Slowloris: thousands of connections that never finish their headers must not stop the server
from answering others. A real uvicorn process with the service's HTTP protocol, short of file
descriptors (1,024) as a busy server would be, and 2,000 half-open connections."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
HALF_REQUEST = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: "  # never ends


async def app(scope: dict[str, object], receive: object, send: object) -> None:
    """The smallest ASGI app: the bounds live in the HTTP protocol, not in the app."""
    assert scope["type"] in ("http", "lifespan")
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


def child(port: int, header_timeout_s: float, per_address: int) -> None:
    """The server process: uvicorn with the guarded protocol and 1,024 file descriptors."""
    import uvicorn

    from service.api.connections import guarded_http

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    http = guarded_http(header_timeout_s=header_timeout_s, per_address=per_address)
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, log_level="error", lifespan="off")


@pytest.fixture
def server() -> Iterator[str]:
    port = free_port()
    code = f"import tests.test_slow_clients as t; t.child({port}, 1.0, 50)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, "the server died"
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


def half_open(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(HALF_REQUEST)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_half_open_connections_do_not_starve_other_clients(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    # 1,500 from one address (all but 50 are closed at once), 500 more from 10 other addresses
    # (within the per-address bound: they last until the header timeout).
    slow: list[socket.socket] = []
    try:
        fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
        with httpx.Client(base_url=server, timeout=10, limits=fresh) as normal:
            for n in range(2000):
                source = "127.0.0.2" if n < 1500 else f"127.0.1.{n % 10 + 1}"
                slow.append(half_open(port, source))
                if n % 200 == 0:  # normal clients keep being answered throughout
                    assert normal.get("/").status_code == 200
            assert normal.get("/").status_code == 200
            still_open = [s for s in slow if not closed_by_server(s)]
            assert len(still_open) <= 50 + 500  # the per-address bound
            for _ in range(100):  # then the header timeout (1 s) closes the rest
                if all(closed_by_server(s) for s in still_open):
                    break
                time.sleep(0.1)
            assert all(closed_by_server(s) for s in still_open)
            assert normal.get("/").status_code == 200
    finally:
        for s in slow:
            s.close()
