"""The gateway's requesters: enrolment with an API key (only its SHA-256 is kept), deposits, the
two ledger accounts each one has (wallet and escrow), and authentication of `Bearer` keys. A part of
`Gateway` (its base class), apart because it never touches a lease."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..ledger.book import DEPOSITS
from ..service.errors import ApiError
from ..service.schema import RequesterRow

if TYPE_CHECKING:
    from ..service.control import ControlPlane


def requester_account(requester_id: str) -> str:
    return f"requester:{requester_id}"


def requester_escrow(requester_id: str) -> str:
    return f"requester-escrow:{requester_id}"


class RequesterAccounts:
    """Requesters' keys and money (Gateway's base: `control` is the gateway's control plane)."""

    control: ControlPlane

    def enroll_requester(self, requester_id: str, deposit_micro: int) -> dict[str, Any]:
        """A new requester and its API key (shown once; only its SHA-256 is kept)."""
        key = "poi-" + secrets.token_urlsafe(24)
        row = RequesterRow(
            requester_id=requester_id,
            key_sha256=hashlib.sha256(key.encode()).hexdigest(),
            enrolled_at=time.time(),
        )
        try:
            with self.control.ledger.session() as session, session.begin():
                session.add(row)
        except IntegrityError:
            raise ApiError(409, f"a new requester id ({requester_id!r} is taken)", requester_id) from None
        self.control.ledger.open_account(requester_account(requester_id), "wallet")
        self.control.ledger.open_account(requester_escrow(requester_id), "escrow")
        if deposit_micro:
            self.deposit(requester_id, deposit_micro, f"enroll:{requester_id}")
        return {"requester_id": requester_id, "api_key": key, **self.balance(requester_id)}

    def deposit(self, requester_id: str, micro: int, key: str) -> dict[str, Any]:
        self._requester(requester_id)
        legs = {DEPOSITS: -micro, requester_account(requester_id): micro}
        self.control.ledger.transfer(f"deposit:{key}", "deposit", legs, memo=f"deposit for {requester_id}")
        return self.balance(requester_id)

    def balance(self, requester_id: str) -> dict[str, Any]:
        """The requester's two accounts (opened at enrolment), not every balance in the ledger."""
        return {
            "wallet_micro": self.control.ledger.balance(requester_account(requester_id)),
            "held_micro": self.control.ledger.balance(requester_escrow(requester_id)),
        }

    def _requester(self, requester_id: str) -> RequesterRow:
        with Session(self.control.ledger.engine) as session:
            row = session.get(RequesterRow, requester_id)
        if row is None:
            raise ApiError(404, "an enrolled requester", f"unknown requester {requester_id!r}")
        return row

    def authenticate(self, authorization: str | None) -> str:
        """The requester id of a `Bearer <api key>` header (401 otherwise)."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "Authorization: Bearer <API key from POST /v1/admin/requesters>", "none")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        with Session(self.control.ledger.engine) as session:
            requester = session.scalar(
                select(RequesterRow.requester_id).where(RequesterRow.key_sha256 == digest)
            )
        if requester is None:
            raise ApiError(401, "an API key Maxwell issued", "an unknown key")
        return requester
