"""What the service refuses, as its client should hear it.

Every refusal the code raises is a :class:`ServiceError`: an HTTP status, a stable ``code`` a
client can branch on (it never changes with the wording), the message, the extra fields of its
body and its headers. Domain code (the engine, the stores, the reload) raises them without
knowing anything of HTTP but the status number; the API turns every one of them into one body,
``{"detail": ..., "code": ..., **fields}``, in one handler (:mod:`service.api.errors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RETRY_AFTER_S = 1  # what a refused write is told to wait: Redis restarts take about a second


class ServiceError(Exception):
    """A refusal; subclasses set ``status`` and ``code`` and may add body fields and headers."""

    status: int = 400
    code: str = "bad_request"

    @property
    def detail(self) -> str:
        """The message of the body (by default the exception's own)."""
        return str(self)

    def fields(self) -> dict[str, Any]:
        """Body fields beside ``detail`` and ``code``."""
        return {}

    def headers(self) -> dict[str, str]:
        return {}


class Refused(ServiceError):
    """A refusal that needs no type of its own: status, code, message (and headers) given
    where it is raised."""

    def __init__(
        self, status: int, code: str, detail: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self._headers = status, code, dict(headers or {})

    def headers(self) -> dict[str, str]:
        return self._headers


class NotFound(Refused):
    def __init__(self, detail: str, *, code: str = "not_found") -> None:
        super().__init__(404, code, detail)
