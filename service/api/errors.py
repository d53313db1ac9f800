"""Every refusal as one JSON body: ``{"detail": ..., "code": ...}`` plus the fields of its kind.

The service's own refusals are :class:`~service.errors.ServiceError`s, turned into that body by
one handler. The two kinds the framework raises take the same shape: a request whose fields fail
validation (``code`` ``invalid_fields``, ``detail`` the list of fields, without echoing the
input) and Starlette's own statuses (an unknown path, a wrong method: ``code`` from the status).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import ServiceError


class BodyRefused(HTTPException):
    """A refusal met while the framework reads a request's body (its size, its form): FastAPI
    lets only an ``HTTPException`` out of that step and answers anything else with a generic
    400 ("There was an error parsing the body"), so these are one, with a ``code`` of their
    own."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status, detail)
        self.code = code


def install_errors(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _framework)  # type: ignore[arg-type]


def problem(
    status: int,
    code: str,
    detail: str | list[dict[str, Any]],
    *,
    fields: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one error body."""
    content = {"detail": detail, "code": code, **(fields or {})}
    return JSONResponse(content, status_code=status, headers=dict(headers or {}))


async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
    return problem(
        exc.status, exc.code, _printable(exc.detail), fields=exc.fields(), headers=exc.headers()
    )


async def _framework(request: Request, exc: HTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or _snake(HTTPStatus(exc.status_code).phrase)
    headers = exc.headers
    methods = _methods(request) if exc.status_code == 405 else []
    if methods:
        headers = {**(headers or {}), "Allow": ", ".join(methods)}
    return problem(exc.status_code, code, _printable(str(exc.detail)), headers=headers)


def _methods(request: Request) -> list[str]:
    """The methods of every operation on the request's path (Starlette's Allow names those
    of the first route on it only: ``GET /items/{id}`` hid ``PATCH /items/{id}``)."""
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = "[^/]+".join(map(re.escape, re.split(r"\{[^}/]+\}", template)))
        if re.fullmatch(pattern, request.url.path):
            return sorted(method.upper() for method in operations)
    return []


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without echoing the input: a NaN, an infinity or a lone surrogate in it
    cannot be written as JSON, and the default handler answered 500 instead. A body that is not
    JSON by its Content-Type (``curl -d`` sends a form) is told so, with 415."""
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type) and any(e["loc"] == ("body",) for e in errors):
        detail = (
            "the body must be JSON sent with Content-Type: application/json, not "
            f"{content_type or 'without a Content-Type'}"
        )
        return problem(415, "not_json", _printable(detail))
    fields = [
        {
            "loc": [_printable(x) if isinstance(x, str) else x for x in e["loc"]],
            "msg": _printable(e["msg"]),
            "type": e["type"],
        }
        for e in errors
    ]
    return problem(422, "invalid_fields", fields)


def _snake(phrase: str) -> str:
    """``Not Found`` -> ``not_found``."""
    return phrase.lower().replace(" ", "_").replace("-", "_")


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so it can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
