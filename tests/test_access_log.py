"""The access log is a setting: none by default, every request, or one in N."""

from __future__ import annotations

import logging
import logging.config

import pytest

from service.config import Settings
from service.serve import log_config


@pytest.mark.parametrize(("share", "written"), [(1.0, 250), (0.1, 25), (0.01, 3)])
def test_the_access_log_keeps_the_configured_share(
    share: float, written: int, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.config.dictConfig(log_config(share))
    access = logging.getLogger("uvicorn.access")
    for i in range(250):
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", f"/recommend/{i}", "1.1", 200)
    lines = [line for line in capsys.readouterr().out.splitlines() if "GET /recommend/" in line]
    assert len(lines) == written
    assert "/recommend/0 " in lines[0]  # the first request of each stretch


def test_no_access_log_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISREC_ACCESS_LOG", raising=False)
    assert Settings(checkpoint="c.pt", features="f").access_log == 0  # type: ignore[arg-type]
    monkeypatch.setenv("VISREC_ACCESS_LOG", "2")
    with pytest.raises(ValueError, match="access_log"):
        Settings(checkpoint="c.pt", features="f")  # type: ignore[arg-type]
