"""Queued L4 audits: intake draws the lottery; workers re-execute; these threads finalise the verdict.

The queue is the database (`cp_leases.status = 'audit_pending'`), not memory: the in-process queue
only says "look now", and on start every pending lease is queued again, so a restart loses no
audit. Each of `workers` threads reads one pending lease, hands it to the audit backend
(service.audit_backends: threads, a process pool, or Ray actors) as a plain job and waits for the
result; finalising is service.settlement's (one transaction: verdict, lease state, stake release or
slash), and is idempotent: a lease whose verdict is already final is skipped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session

from ..ledger import Ledger
from ..node.attest import open_evidence
from ..protocol.keys import Keyring
from ..protocol.result import AttestationResult, LayerName, LayerResult, Status, Verdict
from .audit_backends import AuditBackend, AuditJob
from .schema import AgentRow, LeaseRow, ReceiptRow, VerdictRow
from .settlement import EXACT_TIER, finalise, pending_audits

log = logging.getLogger(__name__)


class AuditWorkers:
    def __init__(
        self,
        ledger: Ledger,
        backend: AuditBackend,
        nodes: Keyring,
        workers: int = 1,
        on_done: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.backend = backend  # runs L0 + L4 on a job; finalising stays here
        self.nodes = nodes
        self.workers = workers
        self.on_done = on_done  # (lease_id, verdict, seconds): metrics
        self.queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        # queued or being audited now (settlement, a restart and the poll may all queue one)
        self._queued: set[str] = set()
        self._stopping = threading.Event()
        self._failed: set[str] = set()  # audits that raised: not polled again until the next start
        self._poller: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, poll_s: float | None = None) -> int:
        """Start the threads; queue every audit still pending in the database. Returns how many.
        With `poll_s`, the database is looked at again that often (leases other API processes took
        in: service.leader)."""
        pending = pending_audits(self.ledger)
        for lease_id in pending:
            self.submit(lease_id)
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"poi-audit-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if poll_s is not None:
            self._stopping.clear()
            t = threading.Thread(target=self._poll, args=(poll_s,), name="poi-audit-poll", daemon=True)
            t.start()
            self._poller = t
        return len(pending)

    def _poll(self, every_s: float) -> None:
        while not self._stopping.wait(every_s):
            try:
                for lease_id in pending_audits(self.ledger):
                    if lease_id not in self._failed:  # a broken lease waits for the next start
                        self.submit(lease_id)
            except Exception:  # a database hiccup: the next poll tries again
                log.exception("looking for pending audits failed")

    def submit(self, lease_id: str) -> None:
        """Queue a lease once: a second wake-up for a lease still queued adds nothing."""
        with self._lock:
            if lease_id in self._queued:
                return
            self._queued.add(lease_id)
        self.queue.put(lease_id)

    def depth(self) -> int:
        return self.queue.qsize()

    def stop(self) -> None:
        self._stopping.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()

    def close(self) -> None:
        """Stop the threads, then the backend's workers (an audit cut short stays pending)."""
        self.stop()
        self.backend.close()

    def drain(self, timeout_s: float = 300.0) -> bool:
        """Wait until no audit is pending (tests, demo); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pending_audits(self.ledger):
                return True
            time.sleep(0.05)
        return False

    def _loop(self) -> None:
        while (lease_id := self.queue.get()) is not None:
            try:
                self.audit(lease_id)
            except Exception:  # one broken lease must not stop the worker; it stays pending
                log.exception("audit of lease %s failed; it stays pending for the next start", lease_id)
                self._failed.add(lease_id)
            finally:
                with self._lock:  # only now: a poll meanwhile must not queue it a second time
                    self._queued.discard(lease_id)

    def audit(self, lease_id: str) -> Verdict | None:
        """Run L4 for one pending lease and finalise it; the verdict, or None if nothing was pending."""
        t0 = time.perf_counter()
        with Session(self.ledger.engine) as session:
            row, receipt, verdict = (session.get(k, lease_id) for k in (LeaseRow, ReceiptRow, VerdictRow))
            agent = session.get(AgentRow, row.agent_id) if row is not None else None
        if row is None or receipt is None or verdict is None or verdict.final or row.tier == EXACT_TIER:
            return None  # the exact tier's L4 runs inside its own audit (service.exact_audits)
        audit = self.run_l4(row, receipt, agent)
        inline = [LayerResult.from_dict(d) for d in json.loads(verdict.layers)]
        final = finalise(self.ledger, row, with_l4(inline, audit))
        if final is not None and self.on_done:
            self.on_done(lease_id, final, time.perf_counter() - t0)
        return final

    def run_l4(self, row: LeaseRow, receipt: ReceiptRow, agent: AgentRow | None) -> AttestationResult:
        """L0 + L4 on the backend's workers for a lease taken in (the node's evidence re-opened here)."""
        evidence = open_evidence(receipt.evidence, self.nodes).evidence  # checked here, sent opened
        job = AuditJob(
            row.lease_json,
            receipt.receipt,
            evidence.as_dict(),
            receipt.received_at,
            agent.public_key if agent is not None else "",
        )
        return AttestationResult.from_dict(self.backend.submit(job).result())


def with_l4(inline: list[LayerResult], audit: AttestationResult) -> list[LayerResult]:
    """The inline layers with L4's result in place of any earlier one (and anything L0 refused)."""
    return [r for r in inline if r.layer != LayerName.AUDIT] + [
        r for r in audit.layers if r.layer == LayerName.AUDIT or r.status is Status.FAIL
    ]
