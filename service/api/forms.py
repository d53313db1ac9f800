"""Multipart forms whose text fields must be what they claim to be.

Starlette reads a form field that is not valid in the form's charset (UTF-8 unless the
request's ``Content-Type`` names another) as Latin-1 instead of refusing it, so a title sent
in another encoding, or cut in the middle of a character, is stored as different text than
the client had. Routes of :class:`StrictForms` refuse such a form with 400 and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api.errors import BodyRefused


class _StrictParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)  # set by parse(): a known codec
            except UnicodeDecodeError as err:
                raise MultiPartException(
                    f"form field {part.field_name!r} is not valid {self._charset}: "
                    f"{err.reason} at byte {err.start}"
                ) from None
        super().on_part_end()


class _StrictFormRequest(Request):
    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        kind = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        if self._form is None and kind == "multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _StrictParser(
                        self.headers,
                        stream,
                        max_files=max_files,
                        max_fields=max_fields,
                        max_part_size=max_part_size,
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise BodyRefused(400, "unreadable_form", exc.message) from None
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class StrictForms(APIRoute):
    """A route whose multipart form text fields must decode in the form's charset (400 if
    not)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictFormRequest(request.scope, request.receive))

        return strict
