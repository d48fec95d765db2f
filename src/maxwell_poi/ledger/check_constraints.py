"""Widening a CHECK constraint in an alembic migration, on PostgreSQL and on SQLite.

PostgreSQL drops and re-adds the constraint. SQLite cannot alter a CHECK, so the table is rebuilt
from its own stored DDL with the new list — by copying its rows aside, dropping it, creating it
anew and copying them back (not alembic's "create a temporary table and rename it"): migrations run
in one transaction with foreign keys on, where they cannot be switched off, and other tables refer
to the rebuilt one. With foreign-key checks deferred to the commit, the drop counts the children's
rows as orphaned and re-inserting their parents counts them back, so the commit finds nothing wrong
(a renamed table would leave them counted).
"""

from __future__ import annotations

from typing import Any


def replace_check(op: Any, table: str, name: str, old: str, new: str) -> None:
    """Constraint `name` on `table` becomes `new` (it was `old`); `op` is alembic's operations."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint(name, table, type_="check")
        op.create_check_constraint(name, table, new)
        return
    ddl = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).scalar_one()
    if ddl.count(old) != 1:
        raise RuntimeError(f"expected {table}'s DDL to hold {old!r} once, got {ddl!r}")
    indexes = (
        bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
            (table,),
        )
        .scalars()
        .all()
    )
    copy = f"_widen_{table}"
    bind.exec_driver_sql("PRAGMA defer_foreign_keys = ON")  # until this transaction commits
    bind.exec_driver_sql(f"CREATE TABLE {copy} AS SELECT * FROM {table}")
    bind.exec_driver_sql(f"DROP TABLE {table}")
    bind.exec_driver_sql(ddl.replace(old, new))
    bind.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM {copy}")
    bind.exec_driver_sql(f"DROP TABLE {copy}")
    for index in indexes:
        bind.exec_driver_sql(index)
