"""Maxwell's double-entry ledger: the money side of Proof of Inference, on SQLite or PostgreSQL.

Design, and why:

- **Double entry.** Money never appears or vanishes: every transfer is a set of signed entries
  (legs) on accounts that sum to exactly zero — a deposit is `external:deposits -x, wallet:a +x`, a
  stake is `wallet:a -x, escrow:a +x`. The outside world is the only account allowed below zero,
  so "total money in the system" is always what external accounts owe.
- **Balances are derived from entries.** `accounts.balance_micro` is a cache, updated in the same
  database transaction as the entries that change it (so overdraft checks are one locked row
  read, not a scan). It is never trusted on its own: `check_ledger` re-sums every account's
  entries and reports any cached balance, unbalanced transfer or forbidden overdraft that
  disagrees — tampering with the cache by hand is caught.
- **Integer micro-units.** Amounts are signed 64-bit integers of 10⁻⁶ units: floats cannot
  represent most decimal amounts, and a sum of float legs may be "almost zero". Conversions from
  measurements (joules × price) round once, at the edge (`debit_energy`), and keep the
  measurement in the memo.
- **Idempotency keys.** Every transfer carries a caller-chosen unique key (`stake:<lease>`,
  `energy:<lease>`, …). Retrying after a timeout, or two workers handling the same event, posts
  the money once: the same key with the same legs answers the first transfer (`created=False`),
  with different legs it is refused. The database's UNIQUE constraint decides races, not a lookup.
- **Concurrency.** Each transfer is one transaction that locks its accounts in name order
  (`SELECT … FOR UPDATE` on PostgreSQL; `BEGIN IMMEDIATE` serialises SQLite writers), so
  concurrent transfers neither lose updates nor deadlock. Maxwell's revenue accounts are credited
  by every settlement, so they keep no cached balance and are never locked: their balance is the sum
  of their entries, read when asked (`summed`). Transactions that move several agents' money lock
  their accounts in name order up front (`Ledger.lock_in_order`) or take an advisory turn lock
  alone (`Ledger.take_turn`).

The schema is managed by Alembic migrations shipped in `migrations/`; `open_ledger_db` applies them.
"""

from __future__ import annotations

from .book import DEPOSITS, ENERGY, SLASHED, EntryView, Ledger
from .check import LedgerCheck, check_ledger
from .db import default_ledger_path, ledger_url, migrate, open_ledger_db
from .errors import LedgerError
from .posting import EnergySettled, TransferResult
from .schema import ACCOUNT_KINDS, TRANSFER_KINDS

__all__ = [
    "ACCOUNT_KINDS",
    "DEPOSITS",
    "ENERGY",
    "SLASHED",
    "TRANSFER_KINDS",
    "EnergySettled",
    "EntryView",
    "Ledger",
    "LedgerCheck",
    "LedgerError",
    "TransferResult",
    "check_ledger",
    "default_ledger_path",
    "ledger_url",
    "migrate",
    "open_ledger_db",
]
