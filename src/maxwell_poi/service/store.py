"""The control plane's database: the ledger's engine, with the control plane's tables migrated beside
the ledger's, and the enrolled keys read back into keyrings."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..ledger import Ledger, open_ledger_db
from ..ledger.db import writer
from ..protocol.keys import Keyring
from .schema import AgentRow, NodeRow

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def migrate(engine: Engine, revision: str = "head") -> None:
    """`alembic upgrade <revision>` (head: the latest) for the control plane's tables, in one write
    transaction (a migration test stops at an earlier revision, writes rows, then goes on)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with writer(engine).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def open_store(url: str | Path | None = None) -> Ledger:
    """The ledger (SQLite under $POI_HOME by default, PostgreSQL by URL) with the control plane's
    tables migrated into the same database: one transaction can then cover a verdict and its money."""
    engine = open_ledger_db(url)
    migrate(engine)
    return Ledger(engine)


def load_keyrings(engine: Engine) -> tuple[Keyring, Keyring]:
    """(agents, nodes) as enrolled in the database."""
    with Session(engine) as session:
        agents = {a.agent_id: a.public_key for a in session.scalars(select(AgentRow))}
        nodes = {n.node_id: n.public_key for n in session.scalars(select(NodeRow))}
    return Keyring(agents), Keyring(nodes)
