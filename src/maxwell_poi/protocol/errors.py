"""Errors that carry what was expected and what came, so a refusal explains itself."""

from __future__ import annotations


class PoiError(Exception):
    """Base class for every error this package raises on purpose."""


class FormatError(PoiError):
    """A wire object (lease, receipt, key, keyring) could not be read.

    `what` names the object, `expected` and `got` say what was wanted and what arrived.
    """

    def __init__(self, what: str, expected: str, got: str) -> None:
        self.what = what
        self.expected = expected
        self.got = got
        super().__init__(f"{what}: expected {expected}, got {got}")


class LeaseFormatError(FormatError):
    def __init__(self, expected: str, got: str) -> None:
        super().__init__("lease", expected, got)


class ReceiptFormatError(FormatError):
    def __init__(self, expected: str, got: str) -> None:
        super().__init__("receipt", expected, got)


class KeyFormatError(FormatError):
    def __init__(self, expected: str, got: str) -> None:
        super().__init__("key", expected, got)


class UnknownModelError(PoiError):
    def __init__(self, model_id: str, known: list[str]) -> None:
        self.model_id = model_id
        super().__init__(f"unknown model {model_id!r}; known models: {', '.join(sorted(known))}")


class UnknownAgentError(PoiError):
    def __init__(self, agent_id: str, known: list[str]) -> None:
        self.agent_id = agent_id
        shown = ", ".join(sorted(known)) or "none enrolled"
        super().__init__(f"agent {agent_id!r} is not in the keyring ({shown})")


class EvidenceFormatError(FormatError):
    """A node's signed evidence document could not be read or does not verify."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__("evidence", expected, got)


class EvidenceSignatureError(EvidenceFormatError):
    """Evidence that reads but whose signature does not verify against the node it names."""
