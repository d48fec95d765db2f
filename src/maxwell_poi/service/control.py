"""The control plane without HTTP: enrollment, wallets, the market, intake, audits, and what each
party may read. `api.py` puts routes on it; tests and the local node can call it directly."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..economics.tiers import TierPolicy
from ..ledger import Ledger, check_ledger
from ..ledger.group_commit import GroupCommit
from ..protocol.keys import AgentKey
from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, Verdict
from ..registry.models import Registry, poi_home
from ..registry.profiles import ProfileStore
from ..verifier.ear import ear_claims, sign_ear
from ..verifier.policy import Verifier
from .audit_backends import open_backend
from .audits import AuditWorkers
from .challenges import ChallengeBoard
from .config import ServiceConfig
from .errors import ApiError
from .exact_audits import ExactAudits
from .intake import Intake
from .leader import AuditLead
from .market import Market
from .schema import AgentRow, DisputeRow, LeaseRow, NodeRow, SettingRow, VerdictRow
from .store import load_keyrings, migrate, open_store
from .stored_policy import SETTING as POLICY
from .stored_policy import load_policy
from .wire import Deposit, DisputeBody, EnrollAgent, EnrollNode, LeaseView, PolicyBody

AUDIT_POLL_S = 1.0  # the audit leader looks for leases other processes took in this often


class ControlPlane:
    def __init__(
        self,
        config: ServiceConfig,
        *,
        registry: Registry | None = None,
        profiles: ProfileStore | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.admin_token = config.token()  # made now, so `poi client` finds the file at once
        if ledger is not None:
            migrate(ledger.engine)  # a ledger opened by the caller (tests: a PostgreSQL schema)
        self.ledger = ledger or open_store(config.url)
        self.registry = registry or Registry()
        self.profiles = profiles or ProfileStore()
        self.agents, self.nodes = load_keyrings(self.ledger.engine)
        self.ear_key = AgentKey.ensure(poi_home() / "maxwell-ear.pem")
        inline = Verifier.inline(self.registry, self.agents, self.profiles)
        self.market = Market(self.ledger, self.registry, self.profiles, config, load_policy(self.ledger))
        self.live_path: Callable[[str], str | None] | None = None
        # a pending lease's audit is queued by settlement, however intake was called (HTTP or in-process)
        self.intake = Intake(self.ledger, inline, self.nodes, config.watts_per_core, queue=self.queue_audit)
        self.group_commit = (
            GroupCommit(self.ledger.session, config.group_commit_max, prepare=self.ledger.lock_in_order)
            if config.group_commit_max
            else None
        )
        self.intake.run = self.group_commit.run if self.group_commit else None
        backend = open_backend(
            config.audit_backend, config.audit_workers, registry=self.registry, ray_address=config.ray_address
        )  # L0 + L4 on threads, local processes or Ray actors; finalising stays in AuditWorkers
        self.audits = AuditWorkers(self.ledger, backend, self.nodes, config.audit_workers)
        self.challenges = ChallengeBoard(self.ledger, wake_nodes=self.market.wake)
        self.lead = AuditLead(self.ledger.engine)  # several API processes on one database: one audits
        self.exact = ExactAudits(
            self.ledger,
            self.registry,
            self.challenges,
            self.audits,
            blocks=config.exact_blocks,
            opening_timeout_s=config.opening_timeout_s,
            window_s=config.challenge_window_s,
        )

    @property
    def policy(self) -> TierPolicy:
        """The tier policy in force (the market's: re-read from the database now and then)."""
        return self.market.policy

    def stream_to(self, lease_id: str) -> str | None:
        """Where the node relays this lease's tokens and chunks as they arrive (a path of this API),
        or None. Set by a front door that streams (gateway.Gateway)."""
        return self.live_path(lease_id) if self.live_path else None

    def start(self) -> int:
        """Start the audit workers and the exact tier's — in the one process of those on this database
        that holds the audit lead (service.leader); the others take the lead if it is let go. Returns
        how many audits were pending from before (0 in a process that does not lead)."""
        if self.lead.hold():
            return self._start_audits()
        self.lead.follow(self._start_audits)
        return 0

    def _start_audits(self) -> int:
        return self.audits.start(poll_s=AUDIT_POLL_S) + self.exact.start()

    def queue_audit(self, lease_id: str, drawn: bool) -> None:
        """After intake (called by service.settlement for every pending lease): a drawn L4 goes to the
        audit workers; the exact tier's worker looks anyway. Queueing a lease twice adds nothing. A
        process that does not lead queues nothing: the leader finds the lease in the database."""
        if not self.lead.leading:
            return
        if drawn:
            self.audits.submit(lease_id)
        self.exact.submit(lease_id)

    def drain(self, timeout_s: float = 300.0) -> bool:
        """Wait until no audit of either kind is pending (tests, demo)."""
        return self.audits.drain(timeout_s) and self.exact.drain(timeout_s)

    def close(self) -> None:
        self.lead.close()  # no follower takes the lead now
        self.exact.close()  # before the audit backend: its L4 runs there
        self.audits.close()  # its threads, then the backend's workers
        if self.group_commit is not None:
            self.group_commit.close()  # after the HTTP server stopped: no settlement is waiting
        self.ledger.engine.dispose()

    # -- Maxwell's side -----------------------------------------------------------------------------

    def enroll_agent(self, body: EnrollAgent) -> tuple[dict[str, Any], bool]:
        row = AgentRow(
            agent_id=body.agent_id,
            public_key=body.public_key,
            command=json.dumps(body.command),
            enrolled_at=time.time(),
        )
        created = self._enroll(row, AgentRow, body.agent_id, body.public_key)
        self.agents.enroll(body.agent_id, body.public_key)
        self.ledger.open_account(f"wallet:{body.agent_id}", "wallet")
        if not created:  # re-enrolment: a corrected command, and its failed-lease count afresh
            self.market.reinstate(body.agent_id, body.command)
        return {"agent_id": body.agent_id, "public_key": body.public_key, "command": body.command}, created

    def enroll_node(self, body: EnrollNode) -> tuple[dict[str, Any], bool]:
        row = NodeRow(
            node_id=body.node_id, public_key=body.public_key, enrolled_at=time.time(), headroom_j=0.0
        )
        created = self._enroll(row, NodeRow, body.node_id, body.public_key)
        self.nodes.enroll(body.node_id, body.public_key)
        return {"node_id": body.node_id, "public_key": body.public_key}, created

    def _enroll(self, row: AgentRow | NodeRow, kind: type, ident: str, public_key: str) -> bool:
        """Idempotent: the same id with the same key is fine; another key is refused (409)."""
        try:
            with self.ledger.session() as session, session.begin():
                session.add(row)
            return True
        except IntegrityError:
            with Session(self.ledger.engine) as session:
                existing = session.get(kind, ident)
            if existing is None or existing.public_key != public_key:
                got = existing.public_key[:16] + "…" if existing else "a conflicting row"
                raise ApiError(
                    409, f"{ident!r} enrolled once, with one key", f"already enrolled with {got}"
                ) from None
            return False

    def deposit(self, body: Deposit) -> dict[str, Any]:
        if body.agent_id not in self.agents:
            raise ApiError(404, "an enrolled agent", f"unknown agent {body.agent_id!r}")
        result = self.ledger.deposit(body.agent_id, body.amount_micro, key=f"deposit:{body.key}")
        return {"transfer_id": result.transfer_id, "created": result.created, **self.balance(body.agent_id)}

    def set_policy(self, body: PolicyBody) -> dict[str, Any]:
        if body.high_from_value < body.medium_from_value:
            raise ApiError(
                422,
                "high_from_value >= medium_from_value",
                f"{body.high_from_value} < {body.medium_from_value}",
            )
        self.market.policy = TierPolicy(**body.model_dump())
        with self.ledger.session() as session, session.begin():  # in this plane's database: survives a
            session.merge(SettingRow(name=POLICY, value=json.dumps(asdict(self.policy))))  # restart
        return asdict(self.policy)

    def ledger_report(self) -> dict[str, Any]:
        report = check_ledger(self.ledger.engine)
        return {"balances": self.ledger.balances(), "check": report.as_dict()}

    # -- what an agent may see ----------------------------------------------------------------------

    def own_lease(self, agent_id: str, lease_id: str) -> tuple[LeaseRow, VerdictRow | None]:
        with Session(self.ledger.engine) as session:
            row = session.get(LeaseRow, lease_id)
            verdict = session.get(VerdictRow, lease_id)
        if row is None:
            raise ApiError(404, "a lease issued by this control plane", f"unknown lease {lease_id[:64]!r}")
        if row.agent_id != agent_id:
            # said plainly: the lease exists, and it is not this agent's to read or act on
            raise ApiError(403, f"a lease issued to agent {agent_id!r}", "a lease issued to another agent")
        return row, verdict

    def lease_view(self, row: LeaseRow, verdict: VerdictRow | None) -> LeaseView:
        return LeaseView(
            lease_id=row.lease_id,
            agent_id=row.agent_id,
            node_id=row.node_id,
            status=row.status,
            tier=row.tier,
            audit_probability=row.audit_probability,
            tier_reason=row.tier_reason,
            price_micro_per_j=row.price_micro_per_j,
            hold_micro=row.hold_micro,
            stake_micro=row.stake_micro,
            lease=json.loads(row.lease_json),
            verdict=verdict_view(verdict) if verdict else None,
        )

    def leases_of(self, agent_id: str, limit: int = 100, offset: int = 0) -> list[LeaseView]:
        with Session(self.ledger.engine) as session:
            rows = session.scalars(
                select(LeaseRow)
                .where(LeaseRow.agent_id == agent_id)
                .order_by(LeaseRow.issued_at)
                .offset(offset)
                .limit(limit)
            ).all()
            verdicts = {
                v.lease_id: v
                for v in session.scalars(
                    select(VerdictRow).where(VerdictRow.lease_id.in_([r.lease_id for r in rows]))
                )
            }
        return [self.lease_view(r, verdicts.get(r.lease_id)) for r in rows]

    def balance(self, agent_id: str) -> dict[str, Any]:
        balances = self.ledger.balances()
        return {
            "agent_id": agent_id,
            "wallet_micro": balances.get(f"wallet:{agent_id}", 0),
            "escrow_micro": balances.get(f"escrow:{agent_id}", 0),
        }

    def ear(self, agent_id: str, lease_id: str) -> str:
        row, verdict = self.own_lease(agent_id, lease_id)
        if verdict is None or not verdict.final:
            state = "no receipt yet" if verdict is None else "an audit still pending"
            raise ApiError(409, "a lease with a final verdict", state)
        result = AttestationResult.from_dict(
            {
                "lease_id": lease_id,
                "agent_id": row.agent_id,
                "model_id": json.loads(row.lease_json)["model_id"],
                "layers": json.loads(verdict.layers),
            }
        )
        claims = ear_claims(result, Lease.from_json(row.lease_json), issued_at=verdict.appraised_at)
        return sign_ear(claims, self.ear_key.private_key, key_id=self.ear_key.keyid)

    def dispute(self, agent_id: str, lease_id: str, body: DisputeBody) -> tuple[dict[str, Any], bool]:
        """An agent's answer to a warning or contraindicated verdict, kept for Maxwell to resolve
        (exact layer re-checks come with L3 disputes, a later issue). Once per lease."""
        _row, verdict = self.own_lease(agent_id, lease_id)
        if verdict is None or verdict.verdict == Verdict.AFFIRMING:
            got = "no verdict yet" if verdict is None else "an affirming verdict"
            raise ApiError(409, "a lease with a warning or contraindicated verdict", got)
        try:
            with self.ledger.session() as session, session.begin():
                session.add(DisputeRow(lease_id=lease_id, statement=body.statement, created_at=time.time()))
            created = True
        except IntegrityError:
            created = False
        with Session(self.ledger.engine) as session:
            row = session.get(DisputeRow, lease_id)
        if row.statement != body.statement:
            raise ApiError(409, "one dispute per lease (resend the same statement)", "a different statement")
        return {"lease_id": lease_id, "statement": row.statement, "created_at": row.created_at}, created


def verdict_view(v: VerdictRow) -> dict[str, Any]:
    return {
        "verdict": v.verdict,
        "final": v.final,
        "audit_drawn": v.audit_drawn,
        "reason": v.reason,
        "layers": json.loads(v.layers),
        "energy_j": v.energy_j,
        "energy_memo": v.energy_memo,
        "charge_micro": v.charge_micro,
        "stake_outcome": v.stake_outcome,
        "appraised_at": v.appraised_at,
    }


__all__ = ["ControlPlane", "verdict_view"]
