"""ledger.db: one process's SQLite writers take turns on a lock held from BEGIN IMMEDIATE to the
end of the file's own transaction, and no way out of a transaction keeps it."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from maxwell_poi.ledger import Ledger, LedgerError, check_ledger, open_ledger_db
from maxwell_poi.ledger.db import HOLDS_LOCK, _write_lock


@pytest.fixture()
def book(tmp_path) -> Ledger:
    ledger = Ledger(open_ledger_db(str(tmp_path / "l.sqlite")))
    ledger.deposit("a", 10**9, "dep")
    return ledger


def _free(book: Ledger) -> bool:
    lock = _write_lock(book.engine)
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def test_concurrent_writers_all_commit_and_lose_no_update(book: Ledger) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(40):
                book.transfer(f"t{k}-{i}", "other", {"wallet:a": -1, "maxwell:energy": 1})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert book.balance("maxwell:energy") == 8 * 40 and check_ledger(book.engine).ok
    assert _free(book)


def test_every_way_out_of_a_write_transaction_lets_the_lock_go(book: Ledger) -> None:
    with pytest.raises(LedgerError):  # refused: rolled back
        book.transfer("big", "other", {"wallet:a": -(10**12), "maxwell:energy": 10**12})
    assert _free(book)
    session = book.session()  # closed mid-transaction, neither committed nor rolled back by hand
    session.begin()
    session.execute(text("SELECT 1"))
    assert session.connection().info.get(HOLDS_LOCK) is not None and not _free(book)
    session.close()
    assert _free(book)
    with pytest.raises(RuntimeError), book.session() as s, s.begin():  # the caller's own error
        book.transfer("x", "other", {"wallet:a": -1, "maxwell:energy": 1}, session=s)
        raise RuntimeError("caller failed after posting")
    assert _free(book) and book.balance("maxwell:energy") == 0  # rolled back with it


def test_readers_neither_take_nor_wait_for_the_lock(book: Ledger) -> None:
    lock = _write_lock(book.engine)
    with lock:  # a writer of this process is mid-transaction
        assert book.balance("wallet:a") == 10**9
