"""The control plane's database: the ledger's engine, with the control plane's tables migrated beside
the ledger's, and the enrolled keys read back into keyrings."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..ledger import Ledger, open_ledger_db
from ..ledger.db import lock_migrations, writer
from ..protocol.keys import Keyring
from .schema import AgentRow, NodeRow

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def migrate(engine: Engine, revision: str = "head") -> None:
    """`alembic upgrade <revision>` (head: the latest) for the control plane's tables, in one write
    transaction (a migration test stops at an earlier revision, writes rows, then goes on)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with writer(engine).begin() as connection:
        lock_migrations(connection)  # several API processes may start at once (ledger.db)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def open_store(url: str | Path | None = None) -> Ledger:
    """The ledger (SQLite under $POI_HOME by default, PostgreSQL by URL) with the control plane's
    tables migrated into the same database: one transaction can then cover a verdict and its money."""
    engine = open_ledger_db(url)
    migrate(engine)
    return Ledger(engine)


class StoredKeyring(Keyring):
    """A keyring read from the database that looks an unknown id up again before refusing it: with
    several API processes on one database, an agent or node enrolled through another process is
    known here on its first request (one primary-key read per miss; a miss stays a refusal)."""

    def __init__(self, engine: Engine, row: type[AgentRow] | type[NodeRow]) -> None:
        self._engine, self._row = engine, row
        self._id = row.agent_id if row is AgentRow else row.node_id
        with Session(engine) as session:
            super().__init__({getattr(r, self._id.key): r.public_key for r in session.scalars(select(row))})

    def _look_up(self, ident: object) -> bool:
        if not isinstance(ident, str) or not ident:
            return False
        with Session(self._engine) as session:
            public_key = session.scalar(select(self._row.public_key).where(self._id == ident))
        if public_key is None:
            return False
        self.enroll(ident, public_key)
        return True

    def key_for(self, agent_id: str):  # noqa: ANN201 - the base class's SSlibKey
        if not super().__contains__(agent_id):
            self._look_up(agent_id)
        return super().key_for(agent_id)

    def __contains__(self, agent_id: object) -> bool:
        return super().__contains__(agent_id) or self._look_up(agent_id)


def load_keyrings(engine: Engine) -> tuple[Keyring, Keyring]:
    """(agents, nodes) as enrolled in the database, looked up again on a miss."""
    return StoredKeyring(engine, AgentRow), StoredKeyring(engine, NodeRow)
