"""The exact tier (economics.tiers.Tier.EXACT): optimistic acceptance, L3 challenges and disputes.

Intake accepts an exact-tier receipt at once (L0–L2 inline, energy settled) and keeps its stake
escrowed: the verdict is not final and the lease stays `audit_pending`. Here, for each such lease:

1. **L4 lottery.** If intake drew the lease's audit, the L4 re-execution runs on the audit backend.
2. **Dispute.** When L4 disagrees and the receipt carries a trace root, Maxwell bisects the trace
   against its own prefill, asking the agent for one committed block input per round, down to the
   first block whose committed output does not follow; it recomputes that one block and names the
   operation. The dispute's result joins the verdict's layers (under L3).
3. **Challenge (L3)**, of every lease L4 did not find wrong: **every block** (verifier.every_block),
   so a cheat in one block is caught on every challenged lease. After the receipt is in, Maxwell
   asks the agent — through the lease's node (service.challenges) — to open its kept trace, in
   parts of at most `blocks` blocks and a byte budget the relay carries, and checks each part
   against the receipt's signed trace root and each block exactly (Freivalds on the linear
   operations with secret vectors, Maxwell's replay of everything between them). No opening in
   time after the node took the question, a refusal, a forged tensor, a block missing or one that
   does not follow: L3 fails, and the first failure ends the challenge. A question no pull of the
   node took before its deadline (`Outcome.UNDELIVERED`) is Maxwell's failure, not evidence: it
   ends the challenge as an L3 **warning** naming the node — settled as every warning is, the
   stake neither released nor slashed (held). A dispute's undelivered question leaves its L3 entry
   a warning too (the L4 disagreement that started the dispute still stands).
4. **Window.** A lease whose checks all passed becomes final — stake released — once its challenge
   window (`challenge_window_s` from intake) has closed; a failed check is final at once (stake
   slashed, whatever the window).

The queue is the database: on start every pending exact-tier lease is looked at again; one whose
verdict already carries an L3 result waits only for its window, one without is challenged afresh
(new draws; the agent keeps its traces for the window, so nothing is lost by a restart).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session

from ..ledger import Ledger
from ..protocol.errors import PoiError
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims, open_receipt
from ..protocol.result import LayerName, LayerResult, Status, Verdict
from ..protocol.trace import Opening, opening_keys
from ..registry.models import LoadedModel, Registry
from ..verifier.dispute import DisputeResult, bisect, reference_inputs
from ..verifier.every_block import appraise_every_block
from ..verifier.exact import FreivaldsKey, IntFreivaldsKey, key_for, traced_ops
from .audits import AuditWorkers, with_l4
from .challenges import Asked, ChallengeBoard
from .schema import AgentRow, LeaseRow, ReceiptRow, VerdictRow
from .settlement import finalise, pending_audits
from .states import ChallengeKind

log = logging.getLogger(__name__)
MAX_RECEIPT = 64 << 20  # taken in already under the lease's own limit; this is only a guard


class ExactAudits:
    def __init__(
        self,
        ledger: Ledger,
        registry: Registry,
        board: ChallengeBoard,
        l4: AuditWorkers,
        *,
        blocks: int = 2,  # most blocks per opening (one challenge on the wire); 0: the byte budget
        opening_timeout_s: float = 30.0,
        window_s: float = 60.0,
        on_done: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.registry = registry
        self.board = board
        self.l4 = l4  # its backend runs the drawn L4 re-executions
        self.blocks = blocks  # a lease is still opened whole: this only sizes each part
        self.opening_timeout_s = opening_timeout_s
        self.window_s = window_s
        self.on_done = on_done
        self._keys: dict[str, FreivaldsKey | IntFreivaldsKey] = {}  # secret vectors, once per model
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------------------------

    def start(self) -> int:
        """Start the worker; returns how many exact-tier leases were pending from before."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="poi-exact", daemon=True)
        self._thread.start()
        return len(pending_audits(self.ledger, exact=True))

    def submit(self, _lease_id: str) -> None:
        self._wake.set()  # the database is the queue; this only says "look now"

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def drain(self, timeout_s: float = 300.0) -> bool:
        """Wait until no exact-tier lease is pending (tests, demo); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pending_audits(self.ledger, exact=True):
                return True
            self._wake.set()
            time.sleep(0.05)
        return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            for lease_id in pending_audits(self.ledger, exact=True):
                if self._stop.is_set():
                    return
                try:
                    self.step(lease_id)
                except Exception:  # one broken lease must not stop the others; it stays pending
                    log.exception("exact audit of lease %s failed; it stays pending", lease_id)
            self._wake.wait(0.5)  # the window sweep: closes leases whose window has passed
            self._wake.clear()

    # -- one lease ----------------------------------------------------------------------------------

    def step(self, lease_id: str) -> Verdict | None:
        """Advance one pending lease: challenge it if not yet, finalise it when due. Returns the
        final verdict when it became final now, else None."""
        t0 = time.perf_counter()
        with Session(self.ledger.engine) as session:
            row, receipt, verdict = (session.get(k, lease_id) for k in (LeaseRow, ReceiptRow, VerdictRow))
            agent = session.get(AgentRow, row.agent_id) if row is not None else None
        if row is None or receipt is None or verdict is None or verdict.final:
            return None
        layers = [LayerResult.from_dict(d) for d in json.loads(verdict.layers)]
        checked = any(r.layer == LayerName.EXACT for r in layers)
        if not checked:
            layers = layers + self.check(row, receipt, agent, verdict.audit_drawn, layers)
        failed = any(r.status is Status.FAIL for r in layers)
        if not checked and not failed:  # passed: kept with the verdict until the window closes
            self._keep_layers(lease_id, layers)
        if not failed and time.time() < receipt.received_at + self.window_s:
            return None
        final = finalise(self.ledger, row, layers)
        if final is not None and self.on_done:
            self.on_done(lease_id, final, time.perf_counter() - t0)
        return final

    def check(
        self,
        row: LeaseRow,
        receipt: ReceiptRow,
        agent: AgentRow | None,
        drawn: bool,
        inline: list[LayerResult],
    ) -> list[LayerResult]:
        """The new layers: a drawn L4 first — when it disagrees, the dispute bisects the trace to the
        block (which subsumes a spot check); otherwise the L3 challenge of every block."""
        lease = Lease.from_json(row.lease_json)
        try:
            claims = open_receipt(receipt.receipt, MAX_RECEIPT).claims
            model = self.registry.load(lease.model_id)
        except PoiError as exc:  # L0 passed it inline, so this is Maxwell's side: say so, fail closed
            return [LayerResult(LayerName.EXACT, Status.FAIL, f"L3 could not run: {exc}")]
        l4: list[LayerResult] = []
        if drawn:
            l4 = [r for r in with_l4(inline, self.l4.run_l4(row, receipt, agent)) if r not in inline]
            if any(r.status is Status.FAIL for r in l4):
                return [*l4, self._dispute(row, lease, claims, model)] if claims.trace else l4
        return [self._challenge(row, lease, claims, model, self._key(model)), *l4]

    def _key(self, model: LoadedModel) -> FreivaldsKey | IntFreivaldsKey:
        if model.spec.model_id not in self._keys:
            self._keys[model.spec.model_id] = key_for(model)
        return self._keys[model.spec.model_id]

    def _challenge(
        self,
        row: LeaseRow,
        lease: Lease,
        claims: ReceiptClaims,
        model: LoadedModel,
        key: FreivaldsKey | IntFreivaldsKey,
    ) -> LayerResult:
        """Every block opened, part by part, each part one question relayed by the lease's node."""
        total, ops = len(model.layers), traced_ops(model)
        undelivered: list[Asked] = []

        def opener(blocks: list[int]) -> Opening | str:
            keys = opening_keys(blocks, total, ops)
            asked = self.board.ask(
                lease.lease_id, row.node_id, ChallengeKind.L3, keys, self.opening_timeout_s
            )
            if not asked.evidence:
                undelivered.append(asked)  # ends the challenge (its reason is the opening's problem)
            return asked.opening if asked.opening is not None else asked.reason

        prompt = model.encode_prompt(lease.job.prompt) if isinstance(lease.job, GenerateJob) else []
        positions = len(prompt) + len(claims.tokens())  # only sizes the parts: a wrong size fails closed
        result = appraise_every_block(
            claims, lease.nonce_bytes, model, key, opener, positions=positions, most_blocks=self.blocks
        )
        return not_evidence(result, undelivered)

    def _dispute(self, row: LeaseRow, lease: Lease, claims: ReceiptClaims, model: LoadedModel) -> LayerResult:
        t0 = time.perf_counter()
        reference = reference_inputs(model, model.encode_prompt(lease.job.prompt), claims.tokens())
        why: list[str] = []
        undelivered: list[Asked] = []
        waited = [0.0]  # the round trips through the node: the agent's time, not Maxwell's work

        def opener(keys: list[tuple[int, str]]) -> Opening | None:
            kind = ChallengeKind.SETTLE if len(keys) > 1 else ChallengeKind.BISECT
            asked = time.perf_counter()
            got = self.board.ask(lease.lease_id, row.node_id, kind, keys, self.opening_timeout_s)
            waited[0] += time.perf_counter() - asked
            if got.opening is None:  # bisect stops at the first opening that does not come
                why.append(got.reason)
                if not got.evidence:
                    undelivered.append(got)
            return got.opening

        result = bisect(model, reference, claims.trace or "", lease.nonce_bytes, opener)
        return not_evidence(dispute_layer(result, why, time.perf_counter() - t0, waited[0]), undelivered)

    def _keep_layers(self, lease_id: str, layers: list[LayerResult]) -> None:
        with self.ledger.session() as session, session.begin():
            current = session.get(VerdictRow, lease_id, with_for_update=True)
            if current is not None and not current.final:
                current.layers = json.dumps([r.as_dict() for r in layers])


def not_evidence(result: LayerResult, undelivered: list[Asked]) -> LayerResult:
    """An L3 failure that came from a question Maxwell never delivered is no evidence about the
    agent: a WARN with the same reason and details (settled as a warning: the stake held, neither
    released nor slashed). Any other result stands as it is."""
    if not undelivered or result.status is not Status.FAIL:
        return result
    details = {**result.details, "undelivered_challenge": undelivered[-1].challenge_id}
    reason = result.reason
    if "dispute" in result.details:  # not "dispute lost": it could not go on
        probes = len(result.details["dispute"].get("probes", []))
        reason = f"dispute not finished ({probes} openings): {undelivered[-1].reason}"
    return LayerResult(LayerName.EXACT, Status.WARN, reason, cost_s=result.cost_s, details=details)


def dispute_layer(result: DisputeResult, why: list[str], cost_s: float, waited_s: float = 0.0) -> LayerResult:
    """A dispute's outcome as an L3 result: the block and operation it found, or why the agent lost.
    `cost_s` is its wall time; `waited_s` of it went on waiting for the agent's openings."""
    details: dict[str, Any] = {"dispute": asdict(result), "waited_for_openings_s": round(waited_s, 4)}
    if result.agent_wins:
        reason = f"dispute: {result.reason}; the L4 disagreement stands outside the traced blocks"
        return LayerResult(LayerName.EXACT, Status.PASS, reason, score=1.0, cost_s=cost_s, details=details)
    where = f"block {result.block} {result.op}" if result.block is not None else "no block"
    reason = f"dispute lost ({where}, {len(result.probes)} openings): {why[0] if why else result.reason}"
    return LayerResult(LayerName.EXACT, Status.FAIL, reason, cost_s=cost_s, details=details)
