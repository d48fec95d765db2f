"""The control plane's routes, one router per role (included by `service.api.create_app`)."""

from . import admin, agent, node, service

__all__ = ["admin", "agent", "node", "service"]
