"""The one error the ledger raises on purpose: a refusal that says what it wanted and what came."""

from __future__ import annotations

from ..protocol.errors import PoiError


class LedgerError(PoiError):
    """A transfer, account or lookup the ledger refused; nothing was written."""

    def __init__(self, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"ledger: expected {expected}, got {got}")
