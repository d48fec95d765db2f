"""Open the ledger's database (SQLite file by default, PostgreSQL by URL) and bring its schema up to date."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.engine import Connection

from .errors import LedgerError

SUPPORTED = ("sqlite", "postgresql")  # the dialects whose upsert and locking posting.py speaks
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
WRITE_OPTION = "ledger_write"
HOLDS_LOCK = "poi_sqlite_write_lock"  # connection.info: this connection holds its file's write lock
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for the file lock before giving up


def default_ledger_path() -> Path:
    """`$POI_HOME/ledger.sqlite` (POI_HOME defaults to ~/.maxwell-poi, as for the registry)."""
    return Path(os.environ.get("POI_HOME", Path.home() / ".maxwell-poi")) / "ledger.sqlite"


def ledger_url(url: str | Path | None = None) -> str:
    """A database URL from a URL, a plain file path (SQLite) or nothing (the default file)."""
    if url is None:
        url = default_ledger_path()
    if isinstance(url, str) and "://" in url:
        return url
    return f"sqlite:///{Path(url).expanduser().resolve()}"


def open_ledger_db(url: str | Path | None = None, *, connect_args: Mapping[str, Any] | None = None) -> Engine:
    """An engine on the ledger database, migrated to the newest schema (a no-op when it already is)."""
    url = ledger_url(url)
    if not url.startswith(SUPPORTED):
        raise LedgerError(f"a database URL starting with one of {SUPPORTED}", repr(url.split("://")[0]))
    args = dict(connect_args or {})
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(url, connect_args=args)
        _serialise_sqlite_writers(engine)
    else:
        engine = create_engine(url, connect_args=args, pool_pre_ping=True)
    migrate(engine)
    return engine


def migrate(engine: Engine) -> None:
    """`alembic upgrade head`, in one write transaction on this engine's database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with writer(engine).begin() as connection:
        lock_migrations(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


MIGRATION_LOCK = 0x504F494D  # "POIM": the advisory lock every migrating process takes first


def lock_migrations(connection: Connection) -> None:
    """Several processes starting on one PostgreSQL database migrate one at a time: the first takes
    this transaction-scoped advisory lock and upgrades, the others wait for it, then find the schema
    at head and do nothing. (SQLite: the migration's BEGIN IMMEDIATE already serialises them.)"""
    if connection.dialect.name == "postgresql":
        # per schema: processes on other schemas of the database migrate their own at the same time
        query = text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))")
        connection.execute(query, {"key": MIGRATION_LOCK})


def writer(engine: Engine) -> Engine:
    """The same engine, marked so that its transactions take SQLite's write lock up front."""
    return engine.execution_options(**{WRITE_OPTION: True})


def reader(engine: Engine) -> Engine:
    """The same engine with one snapshot per transaction (PostgreSQL's default sees each statement anew)."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ")
    return engine  # SQLite: a deferred BEGIN already reads one snapshot under WAL


def _serialise_sqlite_writers(engine: Engine) -> None:
    """SQLAlchemy's pysqlite recipe: we emit BEGIN ourselves, IMMEDIATE for writers.

    A deferred transaction that reads and then writes fails with "database is locked" when another
    writer got in between; BEGIN IMMEDIATE takes the write lock first, so writers queue (up to the
    busy timeout) and every balance read inside a write transaction is the one that gets updated.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver must not emit its own BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer, nor it them
        cursor.close()

    lock = _write_lock(engine)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if not connection.get_execution_options().get(WRITE_OPTION, False):
            connection.exec_driver_sql("BEGIN")
            return
        # this process's writers queue on a lock, in turn, instead of polling SQLite's file lock in
        # its busy handler's growing sleeps (the intake load's p99); other processes still meet that
        if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_S):
            raise LedgerError(
                f"the write lock within {SQLITE_BUSY_TIMEOUT_S:.0f} s", "another writer held it"
            )
        connection.info[HOLDS_LOCK] = lock
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            connection.info.pop(HOLDS_LOCK).release()
            raise

    def _end(connection: Connection, end: str) -> None:
        held = connection.info.pop(HOLDS_LOCK, None)
        if held is None:
            return
        try:  # ended here, so that the lock is let go only once the file's is (SQLAlchemy's own
            # COMMIT/ROLLBACK after this handler then finds no transaction open: a no-op)
            getattr(connection.connection.dbapi_connection, end)()
        finally:
            held.release()

    event.listen(engine, "commit", lambda connection: _end(connection, "commit"))
    event.listen(engine, "rollback", lambda connection: _end(connection, "rollback"))

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        """A connection back in the pool never keeps the lock (its transaction was reset with it)."""
        held = record.info.pop(HOLDS_LOCK, None) if record is not None else None
        if held is not None:
            held.release()


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(engine: Engine) -> threading.Lock:
    """One lock per database file in this process (every engine on the file shares it)."""
    database = engine.url.database or ":memory:"
    key = database if database == ":memory:" else str(Path(database).resolve())
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())
