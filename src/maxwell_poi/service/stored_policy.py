"""The tier policy as stored in the database (`PUT /v1/admin/policy`), re-read now and then: with
several API processes on one database, a policy set through one applies in the others within
TTL_S (one small read per TTL_S, not per bid)."""

from __future__ import annotations

import json
import time

from sqlalchemy.orm import Session

from ..economics.tiers import TierPolicy
from ..ledger import Ledger
from .schema import SettingRow

SETTING = "tier_policy"  # the cp_settings row
TTL_S = 1.0


def load_policy(ledger: Ledger) -> TierPolicy:
    """The stored tier policy, or the default when none was set."""
    with Session(ledger.engine) as session:
        row = session.get(SettingRow, SETTING)
    return TierPolicy(**json.loads(row.value)) if row else TierPolicy()


class StoredPolicy:
    def __init__(self, ledger: Ledger, policy: TierPolicy) -> None:
        self.ledger = ledger
        self.set(policy)

    def get(self) -> TierPolicy:
        if time.monotonic() - self._read_at > TTL_S:
            self.set(load_policy(self.ledger))
        return self._policy

    def set(self, policy: TierPolicy) -> None:
        """The policy in force in this process from now (the caller stores it for the others)."""
        self._policy, self._read_at = policy, time.monotonic()
