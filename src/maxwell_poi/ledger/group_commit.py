"""Group commit: settlements that queue up while one transaction commits are written together in the
next, one SAVEPOINT each, and committed once.

Intake's settlement is a few short statements; under load its cost is dominated by what every
transaction pays once — BEGIN, the write lock, COMMIT and its fsync. One writer thread takes every
settlement waiting when it is free (up to `max_batch`), runs each in its own savepoint of one
transaction, and commits. A settlement that raises rolls back its savepoint only and its caller gets
the exception; the others commit. Callers wait for the commit before they are answered, so an
answer is never given for a settlement that did not commit (a failed COMMIT fails every caller of
the batch, and none of them was answered yet).

Several processes on one PostgreSQL database each run a writer. A group's settlements lock accounts
one settlement after another, so two groups could each hold an account the other wants next (a
deadlock PostgreSQL breaks after a second by failing one: seen as 500s with two API processes).
Each settlement names the accounts it moves (`locks`), and `prepare` runs first in every group
transaction with all of them (`Ledger.lock_in_order` locks them in name order), so groups of
different processes run side by side without a cycle. A settlement that still meets a deadlock or a
serialization failure (an account it did not name, another writer's transaction) is tried again in
a later group, up to RETRIES times.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session

from .retry import RETRIES, retryable

log = logging.getLogger(__name__)
T = TypeVar("T")
Work = Callable[[Session], object]
Item = tuple[Work, Future, int, tuple[str, ...]]  # (work, its caller's future, tries, accounts it moves)


class GroupCommit:
    def __init__(
        self,
        session: Callable[[], Session],
        max_batch: int = 64,
        prepare: Callable[[Session, list[str]], None] | None = None,
    ) -> None:
        """`session`: a factory of write sessions on the database (`Ledger.session`); `prepare`: run
        first in each group's transaction with the accounts its settlements name, sorted
        (`Ledger.lock_in_order`)."""
        self._session = session
        self.max_batch = max_batch
        self._prepare = prepare
        self._queue: queue.Queue[Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write, name="poi-group-commit", daemon=True)
        self._thread.start()
        self.batches = 0  # transactions committed, and the settlements in them (metrics, benches)
        self.items = 0
        self.retried = 0  # settlements tried again after a deadlock or serialization failure

    def run(self, work: Callable[[Session], T], locks: Iterable[str] = ()) -> T:
        """Run `work(session)` in the next group's transaction; its result once that committed.
        `locks`: the accounts it moves, locked in order before any settlement of the group runs."""
        if not self._thread.is_alive():
            raise RuntimeError("the group-commit writer has stopped")
        done: Future = Future()
        self._queue.put((work, done, 0, tuple(locks)))
        return done.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _write(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                break
        while True:  # closed: a settlement queued again after the stop is refused, not left waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(RuntimeError("the group-commit writer has stopped"))

    def _commit(self, batch: list[Item]) -> None:
        outcomes: list[tuple[bool, object]] = []
        try:
            with self._session() as session, session.begin():
                if self._prepare is not None:
                    self._prepare(session, sorted({name for *_, locks in batch for name in locks}))
                for work, *_ in batch:
                    try:
                        with session.begin_nested():
                            outcomes.append((True, work(session)))
                    except Exception as exc:  # its savepoint is rolled back; the others go on
                        outcomes.append((False, exc))
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of this batch is stored
            log.warning("group commit of %d settlements failed: %s", len(batch), exc)
            for item in batch:
                self._fail(item, exc)
            return
        self.batches += 1
        self.items += len(batch)
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                item[1].set_result(value)
            else:
                self._fail(item, value)  # type: ignore[arg-type]

    def _fail(self, item: Item, exc: BaseException) -> None:
        work, done, tries, locks = item
        if retryable(exc) and tries < RETRIES:
            self.retried += 1
            self._queue.put((work, done, tries + 1, locks))  # in a later group, after this one let go
        else:
            done.set_exception(exc)
