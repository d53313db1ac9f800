"""``POST /admin/reload``: replace the serving model without a restart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body

from service.api.schemas import (
    GUARDED,
    INVALID_FIELDS,
    JSON_BODY,
    InvalidFields,
    ReloadRefused,
    ReloadRequest,
    ReloadResponse,
    Responses,
)
from service.api.security import Guards
from service.api.state import StateDep
from service.engine import ReloadFailed

RELOAD_RESPONSES: Responses = {
    **GUARDED,
    **JSON_BODY,
    409: {"model": ReloadRefused, "description": "another reload is running; retry later"},
    422: {
        "model": InvalidFields | ReloadRefused,
        "description": "invalid fields, or files that cannot be served (missing, not a "
        "checkpoint, checkpoint and features that do not match); the old model still serves",
    },
}


def router(guards: Guards, *, roots: Sequence[Path]) -> APIRouter:
    """``roots``: the folders files may be loaded from."""
    folders = tuple(root.resolve() for root in roots)
    routes = APIRouter(dependencies=guards.admin, responses=INVALID_FIELDS)

    @routes.post("/admin/reload", response_model=ReloadResponse, responses=RELOAD_RESPONSES)
    async def reload(
        state: StateDep, body: Annotated[ReloadRequest | None, Body()] = None
    ) -> ReloadResponse:
        """Load a checkpoint (and its features) in the background and swap it in; requests are
        answered by the old model until the swap and by the new one after it. Without a body,
        or for a path left out, the serving files are read again (e.g. replaced in place)."""
        slot = state.models
        checkpoint, features = (body.checkpoint, body.features) if body else (None, None)
        paths = [_inside(text, folders, slot.engine.version) for text in (checkpoint, features)]
        swap = await slot.reload(*paths)
        return ReloadResponse(
            previous_version=swap.previous,
            model_version=swap.current,
            checkpoint=str(swap.source.checkpoint),
            features=str(swap.source.features),
            seconds=round(swap.seconds, 3),
        )

    return routes


class OutsideModelFolders(ReloadFailed):
    code = "outside_model_folders"


def _inside(text: str | None, folders: tuple[Path, ...], serving: str) -> Path | None:
    """``text`` as a path, refused unless it lies (symlinks followed) inside one of ``folders``:
    an admin call must not make the server read arbitrary files."""
    if not text:
        return None
    path = Path(text)
    try:
        resolved = path.resolve()
    except (ValueError, OSError) as err:  # a NUL byte, a lone surrogate, a loop of links
        raise OutsideModelFolders(
            f"{text!r} is not a usable path ({err})", serving=serving
        ) from err
    if any(resolved.is_relative_to(folder) for folder in folders):
        return path
    allowed = ", ".join(str(f) for f in folders)
    raise OutsideModelFolders(
        f"{text} is outside the model folders ({allowed}); put the files there, or add their "
        "folder to VISREC_MODEL_DIRS",
        serving=serving,
    )
