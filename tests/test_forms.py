"""Form text fields are read in their charset or refused, never re-read as Latin-1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Form
from fastapi.testclient import TestClient

from service.api.forms import StrictForms


def _client() -> TestClient:
    app = FastAPI()
    router = APIRouter(route_class=StrictForms)

    @router.post("/echo")
    async def echo(title: Annotated[str, Form()]) -> dict[str, str]:
        return {"title": title}

    app.include_router(router)
    return TestClient(app)


def _multipart(value: bytes, charset: str = "") -> tuple[bytes, dict[str, str]]:
    body = b'--b\r\nContent-Disposition: form-data; name="title"\r\n\r\n' + value + b"\r\n--b--\r\n"
    said = f"; charset={charset}" if charset else ""
    return body, {"Content-Type": f"multipart/form-data; boundary=b{said}"}


def test_text_fields_are_read_in_their_charset_or_refused() -> None:
    client = _client()
    ok = client.post("/echo", files={}, data={"title": "Amélie (2001)"})
    assert ok.status_code == 200 and ok.json() == {"title": "Amélie (2001)"}
    body, headers = _multipart("Amélie".encode("latin-1"))  # not UTF-8, not said otherwise
    bad = client.post("/echo", content=body, headers=headers)
    assert bad.status_code == 400 and "'title' is not valid utf-8" in bad.json()["detail"]
    body, headers = _multipart("Amélie".encode("latin-1"), "latin-1")  # said: read so
    said = client.post("/echo", content=body, headers=headers)
    assert said.status_code == 200 and said.json() == {"title": "Amélie"}
    # A urlencoded form is percent-decoded as Starlette does; only multipart parts are checked
    plain = client.post("/echo", data={"title": "Amélie"})
    assert plain.status_code == 200 and plain.json() == {"title": "Amélie"}
