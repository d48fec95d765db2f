"""Alembic environment for the control plane's tables, run by `maxwell_poi.service.store.migrate`.

Its own version table (`cp_alembic_version`): the ledger's migrations and these share one
database but advance independently.
"""

from __future__ import annotations

from alembic import context

from maxwell_poi.service.schema import ServiceBase

VERSION_TABLE = "cp_alembic_version"


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("service migrations: expected a connection in config.attributes, got none")
    context.configure(
        connection=connection, target_metadata=ServiceBase.metadata, version_table=VERSION_TABLE
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
