"""The control plane's refusals: an HTTP status and what was expected against what came."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Raised anywhere under a route; answered as `{"error": {status, expected, got, message}}`."""

    def __init__(self, status: int, expected: str, got: str, **extra: Any) -> None:
        self.status = status
        self.expected = expected
        self.got = got
        self.extra = extra
        super().__init__(f"expected {expected}, got {got}")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "status": self.status,
                "expected": self.expected,
                "got": self.got,
                "message": str(self),
                **self.extra,
            }
        }
