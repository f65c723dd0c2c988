"""The dashboard (ferry/web) mounted on the control plane, and the one read it needs that
the CLI has no use for: each host's load as DRS sees it.

The files need no token (they hold no data); every call the page makes does.
"""

from __future__ import annotations

import os
from os import PathLike

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from ferry.api.auth import need
from ferry.control.service import ControlPlane
from ferry.domain.auth import Principal, Privilege
from ferry.domain.drs import HostLoad, loads
from ferry.web import SECURITY_HEADERS, static_dir


class _SecureStatic(StaticFiles):
    """StaticFiles whose answers carry the page's security headers too."""

    def file_response(self, full_path: PathLike[str] | str, stat_result: os.stat_result,
                      scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def register_web_routes(app: FastAPI, control: ControlPlane) -> None:
    # Default-value style, as in trust_routes (PEP 563 annotations).
    reader = Depends(need(control.store, Privilege.READ))
    root = static_dir()

    @app.get("/v1/load")
    async def host_loads(_: Principal = reader) -> dict[str, HostLoad]:
        """Each host's CPU and memory load (demand over capacity, 1.0 = full), measured
        as the DRS planner reads it."""
        return loads(await control.drs.snapshot())

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(root / "index.html", media_type="text/html",
                            headers=SECURITY_HEADERS)

    @app.get("/index.html", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/")

    app.mount("/ui", _SecureStatic(directory=root), name="ui")
