"""The ledger's tables as SQLAlchemy models: accounts, transfers and their signed entries.

The models describe the schema for code and for Alembic's autogenerate; the tables themselves are
created by `migrations/versions/*`, which must agree with these models (a test compares them).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ACCOUNT_KINDS = ("wallet", "escrow", "revenue", "external")
TRANSFER_KINDS = (
    "deposit",
    "energy_hold",
    "energy_debit",
    "stake_escrow",
    "stake_release",
    "stake_slash",
    "other",
)
NAME_LENGTH = 200
KEY_LENGTH = 200

DEPOSITS = "external:deposits"
ENERGY = "maxwell:energy"
SLASHED = "maxwell:slashed"
# Maxwell's revenue is credited by every settlement and never debited. A cached balance there would be
# one row that every settlement updates, and so locks: on PostgreSQL the writers of several API
# processes would queue on it (issue 25). These accounts' balance is the sum of their entries, read
# when it is asked for (`ledger.summed`); their cached `balance_micro` stays 0, and postings neither
# lock nor update their row.
SUMMED_ACCOUNTS = frozenset({ENERGY, SLASHED})

# SQLite only auto-numbers an INTEGER PRIMARY KEY, PostgreSQL gets 64-bit ids.
Id = BigInteger().with_variant(Integer(), "sqlite")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint(_one_of("kind", ACCOUNT_KINDS), name="ck_accounts_kind"),
        # Only the outside world (deposits in, withdrawals out) may owe the ledger money.
        CheckConstraint("NOT allow_negative OR kind = 'external'", name="ck_accounts_negative_external"),
        CheckConstraint("allow_negative OR balance_micro >= 0", name="ck_accounts_balance_floor"),
        UniqueConstraint("name", name="uq_accounts_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    allow_negative: Mapped[bool] = mapped_column(Boolean, default=False)
    # A cache of sum(entries.amount_micro), written in the same transaction as the entries;
    # check_ledger proves it against the entries. Always 0 for SUMMED_ACCOUNTS (summed when read).
    balance_micro: Mapped[int] = mapped_column(BigInteger, default=0)


class Transfer(Base):
    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint(_one_of("kind", TRANSFER_KINDS), name="ck_transfers_kind"),
        UniqueConstraint("idempotency_key", name="uq_transfers_idempotency_key"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # The caller's name for this movement of money: posting it twice must not move money twice.
    idempotency_key: Mapped[str] = mapped_column(String(KEY_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    memo: Mapped[str] = mapped_column(Text, default="")
    lease_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Entry(Base):
    __tablename__ = "entries"
    __table_args__ = (
        CheckConstraint("amount_micro <> 0", name="ck_entries_nonzero"),
        # Legs are a mapping account -> amount: one entry per account per transfer.
        UniqueConstraint("transfer_id", "account_id", name="uq_entries_transfer_account"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("transfers.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
