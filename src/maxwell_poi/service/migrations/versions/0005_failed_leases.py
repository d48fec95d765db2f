"""Failed leases (issue 23): `cp_leases.status` may be 'failed' — the node handed in no receipt
(its agent never started or crashed), so nothing was charged and the stake went back.

Only the CHECK constraint widens; no row changes. PostgreSQL drops and re-adds the constraint.
SQLite cannot alter a CHECK, so the table is rebuilt from its own stored DDL with the new list —
by copying its rows aside, dropping it, creating it anew and copying them back (not alembic's
"create a temporary table and rename it"): the migration runs in one transaction with foreign keys
on, where they cannot be switched off, and cp_receipts / cp_verdicts / cp_challenges / … refer to
cp_leases. With foreign-key checks deferred to the commit, the drop counts the children's rows as
orphaned and re-inserting their parents counts them back, so the commit finds nothing wrong (a
renamed table would leave them counted).

Revision ID: cp0005
Revises: cp0004
"""

from __future__ import annotations

from alembic import op

revision = "cp0005"
down_revision = "cp0004"
branch_labels = None
depends_on = None

TABLE = "cp_leases"
NAME = "ck_cp_leases_status"
BEFORE = "status IN ('issued', 'pulled', 'audit_pending', 'settled', 'expired')"
AFTER = "status IN ('issued', 'pulled', 'audit_pending', 'settled', 'expired', 'failed')"


def upgrade() -> None:
    _replace_check(BEFORE, AFTER)


def downgrade() -> None:
    # a failed lease moved no money and has its verdict row: read back as settled
    op.execute(f"UPDATE {TABLE} SET status = 'settled' WHERE status = 'failed'")
    _replace_check(AFTER, BEFORE)


def _replace_check(old: str, new: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint(NAME, TABLE, type_="check")
        op.create_check_constraint(NAME, TABLE, new)
        return
    ddl = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
    ).scalar_one()
    if ddl.count(old) != 1:
        raise RuntimeError(f"migration cp0005: expected {TABLE}'s DDL to hold {old!r} once, got {ddl!r}")
    indexes = (
        bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
            (TABLE,),
        )
        .scalars()
        .all()
    )
    copy = f"_cp0005_{TABLE}"
    bind.exec_driver_sql("PRAGMA defer_foreign_keys = ON")  # until this transaction commits
    bind.exec_driver_sql(f"CREATE TABLE {copy} AS SELECT * FROM {TABLE}")
    bind.exec_driver_sql(f"DROP TABLE {TABLE}")
    bind.exec_driver_sql(ddl.replace(old, new))
    bind.exec_driver_sql(f"INSERT INTO {TABLE} SELECT * FROM {copy}")
    bind.exec_driver_sql(f"DROP TABLE {copy}")
    for index in indexes:
        bind.exec_driver_sql(index)
