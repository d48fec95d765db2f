"""Group commit: settlements that queue up while one transaction commits are written together in the
next, one SAVEPOINT each, and committed once.

Intake's settlement is a few short statements; under load its cost is dominated by what every
transaction pays once — BEGIN, the write lock, COMMIT and its fsync. One writer thread takes every
settlement waiting when it is free (up to `max_batch`), runs each in its own savepoint of one
transaction, and commits. A settlement that raises rolls back its savepoint only and its caller gets
the exception; the others commit. Callers wait for the commit before they are answered, so an
answer is never given for a settlement that did not commit (a failed COMMIT fails every caller of
the batch, and none of them was answered yet).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
T = TypeVar("T")
Work = Callable[[Session], object]


class GroupCommit:
    def __init__(self, session: Callable[[], Session], max_batch: int = 64) -> None:
        """`session`: a factory of write sessions on the database (`Ledger.session`)."""
        self._session = session
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[Work, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write, name="poi-group-commit", daemon=True)
        self._thread.start()
        self.batches = 0  # transactions committed, and the settlements in them (metrics, benches)
        self.items = 0

    def run(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in the next group's transaction; its result once that committed."""
        if not self._thread.is_alive():
            raise RuntimeError("the group-commit writer has stopped")
        done: Future = Future()
        self._queue.put((work, done))
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
                return

    def _commit(self, batch: list[tuple[Work, Future]]) -> None:
        outcomes: list[tuple[bool, object]] = []
        try:
            with self._session() as session, session.begin():
                for work, _ in batch:
                    try:
                        with session.begin_nested():
                            outcomes.append((True, work(session)))
                    except Exception as exc:  # its savepoint is rolled back; the others go on
                        outcomes.append((False, exc))
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of this batch is stored
            log.warning("group commit of %d settlements failed: %s", len(batch), exc)
            for _, done in batch:
                done.set_exception(exc)
            return
        self.batches += 1
        self.items += len(batch)
        for (_, done), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)  # type: ignore[arg-type]
