"""Alembic environment for the ledger, run programmatically by `maxwell_poi.ledger.db.migrate`.

There is no alembic.ini and no URL here: the caller opens the engine (with its SQLite pragmas or
PostgreSQL search_path) and hands a connection in `config.attributes["connection"]`, so the
migration runs on exactly the database and transaction the ledger will use.
"""

from __future__ import annotations

from alembic import context

from maxwell_poi.ledger.errors import LedgerError
from maxwell_poi.ledger.schema import Base


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise LedgerError("a connection in config.attributes['connection'] (use ledger.db.migrate)", "none")
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
