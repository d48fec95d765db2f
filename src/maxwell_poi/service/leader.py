"""Which of several API processes on one database runs the audits: the one holding a lock.

Audits are queued in the database (a lease `audit_pending`), so any process may take a receipt in;
but the workers that re-execute (L4) and challenge (L3) should run once, not once per process. The
process that holds the audit lock runs them and polls the database for pending leases; the others
only take receipts in. On PostgreSQL the lock is a session advisory lock on a connection kept open
for it (the server frees it when the holder's connection dies); on SQLite it is an `fcntl` lock on
a file beside the database (the kernel frees it when the holder exits). A process without it tries
again every few seconds, so a killed leader's audits resume in another process. An in-memory SQLite
database has one process by construction: it always leads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine, text

# the PostgreSQL advisory lock: (this class, the schema's hash): advisory locks are per database, and
# control planes in different schemas of one database (tests, staging beside production) each lead
AUDIT_LOCK = 0x504F4941  # "POIA"
RETRY_S = 2.0  # how often a follower tries to take the lead


class AuditLead:
    """`hold()` once; then `leading` says whether this process runs the audits. `follow(start)`
    calls `start` in a background thread the moment this process takes the lead."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.leading = False
        self._pg: Connection | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self) -> bool:
        if self.leading:
            return True
        if self.engine.dialect.name == "postgresql":
            self.leading = self._hold_advisory()
        else:
            self.leading = self._hold_file()
        return self.leading

    def follow(self, start: Callable[[], object]) -> None:
        """Retry `hold()` every RETRY_S until it succeeds (then run `start`) or `close()`."""

        def retry() -> None:
            while not self._stop.wait(RETRY_S):
                if self.hold():
                    start()
                    return

        self._thread = threading.Thread(target=retry, name="poi-audit-lead", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RETRY_S + 5)
        if self._pg is not None:
            with contextlib.suppress(Exception):  # a dead connection has let the lock go already
                unlock = text("SELECT pg_advisory_unlock(:key, hashtext(current_schema()))")
                self._pg.execute(unlock, {"key": AUDIT_LOCK})
                self._pg.commit()
            with contextlib.suppress(Exception):
                self._pg.close()
            self._pg = None
        if self._fd is not None:
            os.close(self._fd)  # closing the file lets the lock go
            self._fd = None
        self.leading = False

    def _hold_advisory(self) -> bool:
        connection = self.engine.connect()
        try:
            query = text("SELECT pg_try_advisory_lock(:key, hashtext(current_schema()))")
            got = bool(connection.execute(query, {"key": AUDIT_LOCK}).scalar())
            connection.commit()  # a session lock: it outlives this transaction, not the connection
        except Exception:
            connection.close()
            raise
        if not got:
            connection.close()
            return False
        self._pg = connection
        return True

    def _hold_file(self) -> bool:
        database = self.engine.url.database
        if not database or database == ":memory:":
            return True
        path = Path(database).resolve().with_name(Path(database).name + ".audit-lead")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True
