"""`poi serve --workers N`: N API processes on one database, behind one listening socket (uvicorn's
workers). Each process builds its own control plane from the POI_SERVE_* settings the parent
exported; one of them holds the audit lead (service.leader). The gateway streams a completion
through the process that took the request, so it is not served with more than one worker: its
routes answer 503 and say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKERS_ENV = "POI_SERVE_API_WORKERS"  # set by the parent: how many processes serve (for the 503 text)


def _stop_with_parent() -> None:
    """A worker whose parent (uvicorn's supervisor) dies is told to stop (Linux PR_SET_PDEATHSIG),
    instead of serving on as an orphan nobody supervises."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def create_worker_app() -> FastAPI:
    """uvicorn's app factory, called once in every worker process."""
    _stop_with_parent()
    from ..gateway.routes import gateway_paths
    from ..service import ControlPlane, ServiceConfig
    from ..service.api import create_app
    from ..service.errors import ApiError

    control = ControlPlane(ServiceConfig.from_env())
    app = create_app(control)
    workers = os.environ.get(WORKERS_ENV, "several")
    refusal = ApiError(
        503,
        "the gateway on a control plane served by one process (`poi serve --workers 1`)",
        f"this control plane runs {workers} API worker processes",
    )

    async def no_gateway(_request: Request) -> JSONResponse:
        return JSONResponse(refusal.body(), status_code=refusal.status)

    for path, methods in gateway_paths():
        app.add_api_route(path, no_gateway, methods=methods, include_in_schema=False)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        control.start()  # the audits, in the process that takes the lead
        try:
            yield
        finally:
            control.close()

    app.router.lifespan_context = lifespan
    return app
