"""Maxwell's OpenAI-compatible front door: verified completions for clients that never heard of
receipts (gateway.gateway), appraised while they stream (gateway.live), on the control plane;
refused at once when no node could ever run them, sent to a node that is free (gateway.admission)."""

from .gateway import Gateway
from .routes import mount_gateway

__all__ = ["Gateway", "mount_gateway"]
