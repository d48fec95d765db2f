"""What the routes are handed (FastAPI dependencies): the control plane, and who is calling.

Control   the app's ControlPlane (set by `create_app` on app.state)
Admin     a route dependency: `Authorization: Bearer <admin token>` (service.auth.check_admin)
AgentId   the id of the enrolled agent that signed this request (service.auth.verify_request)
NodeId    the id of the enrolled node that signed it
Page      limit / offset query parameters of a listing
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request

from .auth import check_admin, verify_request
from .control import ControlPlane
from .errors import ApiError


async def get_control(request: Request) -> ControlPlane:
    return request.app.state.control


Control = Annotated[ControlPlane, Depends(get_control)]


async def require_admin(control: Control, authorization: Annotated[str | None, Header()] = None) -> None:
    check_admin(authorization, control.admin_token)


Admin = Depends(require_admin)


def signed_by(role: str):  # noqa: ANN201 - a FastAPI dependency
    """A dependency: the id of the enrolled `role` ("agent" or "node") that signed this request."""

    async def dependency(request: Request, control: Control) -> str:
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        keyrings = {"agent": control.agents, "node": control.nodes}
        got_role, ident = verify_request(
            request.headers, request.method, path, body, keyrings, control.config.request_skew_s
        )
        if got_role != role:
            raise ApiError(403, f"a request signed by an {role}", f"one signed by {got_role} {ident!r}")
        return ident

    return dependency


AgentId = Annotated[str, Depends(signed_by("agent"))]
NodeId = Annotated[str, Depends(signed_by("node"))]


@dataclass(frozen=True)
class Paging:
    limit: int
    offset: int


def paging(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Paging:
    return Paging(limit, offset)


Page = Annotated[Paging, Depends(paging)]

__all__ = [
    "Admin",
    "AgentId",
    "Control",
    "NodeId",
    "Page",
    "Paging",
    "get_control",
    "require_admin",
    "signed_by",
]
