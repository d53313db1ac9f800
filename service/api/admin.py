"""Admin routes: replace the serving model without a restart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.reload import ModelSlot, ReloadBusy, ReloadFailed
from service.api.schemas import (
    GUARDED,
    JSON_BODY,
    InvalidFields,
    ReloadRefused,
    ReloadRequest,
    ReloadResponse,
    Responses,
)

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


async def _models(request: Request) -> ModelSlot:
    models: ModelSlot = request.state.models  # from the lifespan state
    return models


ModelsDep = Annotated[ModelSlot, Depends(_models)]


def install_admin(app: FastAPI, *, dependencies: list[Any], roots: Sequence[Path]) -> None:
    """``dependencies``: the admin guard; ``roots``: the folders files may be loaded from."""
    folders = tuple(root.resolve() for root in roots)

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=RELOAD_RESPONSES,
        dependencies=dependencies,
    )
    async def reload(
        slot: ModelsDep,
        body: Annotated[ReloadRequest | None, Body()] = None,
    ) -> ReloadResponse | JSONResponse:
        """Load a checkpoint (and its features) in the background and swap it in; requests are
        answered by the old model until the swap and by the new one after it. Without a body,
        or for a path left out, the serving files are read again (e.g. replaced in place)."""
        checkpoint, features = (body.checkpoint, body.features) if body else (None, None)
        try:
            paths = [_inside(text, folders) for text in (checkpoint, features)]
            swap = await slot.reload(*paths)
        except OutsideModelFolders as err:
            return _refused(422, f"the model was not replaced: {err}", slot)
        except ReloadBusy as err:
            return _refused(409, str(err), slot)
        except ReloadFailed as err:
            return _refused(422, f"the model was not replaced: {err}", slot)
        return ReloadResponse(
            previous_version=swap.previous,
            model_version=swap.current,
            checkpoint=str(swap.source.checkpoint),
            features=str(swap.source.features),
            seconds=round(swap.seconds, 3),
        )


class OutsideModelFolders(ValueError):
    pass


def _inside(text: str | None, folders: tuple[Path, ...]) -> Path | None:
    """``text`` as a path, refused unless it lies (symlinks followed) inside one of ``folders``:
    an admin call must not make the server read arbitrary files."""
    if not text:
        return None
    path = Path(text)
    try:
        resolved = path.resolve()
    except (ValueError, OSError) as err:  # a NUL byte, a lone surrogate, a loop of links
        raise OutsideModelFolders(f"{text!r} is not a usable path ({err})") from err
    if any(resolved.is_relative_to(folder) for folder in folders):
        return path
    allowed = ", ".join(str(f) for f in folders)
    raise OutsideModelFolders(
        f"{text} is outside the model folders ({allowed}); put the files there, or add their "
        "folder to VISREC_MODEL_DIRS"
    )


def _refused(status: int, detail: str, slot: ModelSlot) -> JSONResponse:
    body = ReloadRefused(detail=detail, model_version=slot.engine.version)
    return JSONResponse(status_code=status, content=body.model_dump())
