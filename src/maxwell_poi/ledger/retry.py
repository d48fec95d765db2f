"""Transactions PostgreSQL aborted to break a deadlock (or a serialization failure) are run again.

Two transactions that lock ledger accounts in different orders can each hold what the other wants
next: a pull issuing leases for several agents (each lease's holds lock its agent's accounts) beside
a group commit settling several agents' leases, say. PostgreSQL fails one of them after its
`deadlock_timeout`; nothing of it was stored, so running it again is safe. `retried` does that, up
to RETRIES times with a short jittered wait; a failure that outlasts them reaches the API as a 503
with Retry-After (service.api), never as a 500. SQLite has one writer at a time and never deadlocks.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = 3
RETRYABLE = {"40P01", "40001"}  # PostgreSQL: deadlock detected, serialization failure


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in RETRYABLE


def retried(work: Callable[[], T], what: str, tries: int = RETRIES) -> T:
    """`work()` (one whole transaction), run again while the database aborts it as retryable."""
    for attempt in range(1, tries + 1):
        try:
            return work()
        except DBAPIError as exc:
            if not retryable(exc) or attempt == tries:
                raise
            log.warning("%s: %s (try %d of %d); running it again", what, exc.orig, attempt, tries)
            time.sleep(random.uniform(0.0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")  # the loop returns or raises


__all__ = ["RETRIES", "RETRYABLE", "retried", "retryable"]
