"""The control plane's read-only dashboard: one static page (plain JS, SVG drawn in the browser, no
CDN, no build step) and the one admin route it reads.

    anyone     GET /dashboard   GET /dashboard/static/{dashboard.js|dashboard.css}
    Maxwell    GET /v1/admin/dashboard?limit=50   (Authorization: Bearer <admin token>)

The page takes the admin token from its URL fragment (`/dashboard#token=...`), which browsers never
send to a server, keeps it in the tab's sessionStorage and sends it as a bearer token. Every query
here reads, never writes, and is bounded: a dashboard left open must not load the database.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ..ledger.schema import Account, Entry, Transfer
from ..ledger.summed import current_balances
from ..node.attest import open_evidence
from ..protocol.errors import EvidenceFormatError, UnknownAgentError
from ..protocol.keys import Keyring
from .auth import check_admin
from .control import ControlPlane
from .errors import ApiError
from .schema import AgentRow, CompletionRow, LeaseRow, NodeRow, ReceiptRow, VerdictRow
from .wire import DashboardView

MAX_LEASES = 500
DEFAULT_LEASES = 50
MAX_AGENTS = 200
MAX_NODES = 200
MAX_TRACES = 10
MAX_TRACE_POINTS = 1000  # per series; longer streams are thinned evenly (first and last kept)
MAX_ENTRIES = 2000  # ledger entries read for the balance series, newest first
BALANCE_KINDS = ("wallet", "escrow", "revenue")  # revenue: Maxwell's energy income and slashed stakes
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page runs only its own script and style and talks only to this origin.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class StaticFiles:
    """The page and its assets, read once from the package (importlib.resources: works installed)."""

    files: dict[str, bytes]

    @classmethod
    def load(cls) -> StaticFiles:
        folder = resources.files(__package__).joinpath("static")
        names = ["dashboard.html", *STATIC]
        return cls({name: folder.joinpath(name).read_bytes() for name in names})

    def asset(self, name: str) -> Response:
        if name not in STATIC:
            raise ApiError(404, f"one of the dashboard's files {sorted(STATIC)}", repr(name[:80]))
        return Response(self.files[name], media_type=STATIC[name], headers=HEADERS)

    def page(self) -> HTMLResponse:
        return HTMLResponse(self.files["dashboard.html"], headers=HEADERS)


def mount_dashboard(app: FastAPI, control: ControlPlane) -> None:
    static = StaticFiles.load()

    async def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        check_admin(authorization, control.admin_token)

    @app.get("/dashboard", include_in_schema=False)
    def dashboard_page() -> HTMLResponse:
        return static.page()

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    def dashboard_asset(name: str) -> Response:
        return static.asset(name)

    @app.get(
        "/v1/admin/dashboard", tags=["admin"], dependencies=[Depends(admin)], response_model=DashboardView
    )
    def dashboard_data(
        limit: Annotated[int, Query(ge=1, le=MAX_LEASES)] = DEFAULT_LEASES,
    ) -> dict[str, Any]:
        """What the dashboard shows: agents, nodes, the newest `limit` leases, balances over time
        and the token/CPU traces of the newest leases with a receipt. Read-only and bounded."""
        return snapshot(control, limit)


def snapshot(control: ControlPlane, limit: int = DEFAULT_LEASES) -> dict[str, Any]:
    """What the page shows, read in one snapshot: balances and the entries they are rebuilt from
    must agree, and a lease must not appear without the money it moved."""
    with _snapshot_session(control.ledger.engine) as session:
        agents = agents_view(session)
        nodes = nodes_view(session)
        leases = recent_leases(session, limit)
        accounts = [f"{kind}:{a['agent_id']}" for a in agents for kind in ("wallet", "escrow")]
        balances = balance_series(session, accounts)
        traces = recent_traces(session, control.nodes)
        completions = recent_completions(session, limit)
    return {
        "generated_at": time.time(),
        "limits": {
            "leases": limit,
            "agents": MAX_AGENTS,
            "nodes": MAX_NODES,
            "traces": MAX_TRACES,
            "ledger_entries": MAX_ENTRIES,
        },
        "agents": agents,
        "nodes": nodes,
        "leases": leases,
        "balances": balances,
        "traces": traces,
        "completions": completions,
    }


def recent_completions(session: Session, limit: int) -> list[dict[str, Any]]:
    """The OpenAI gateway's newest completions: who asked, the price, paid / cut / refunded, why."""
    rows = session.scalars(select(CompletionRow).order_by(CompletionRow.created_at.desc()).limit(limit))
    return [
        {
            "lease_id": r.lease_id,
            "requester": r.requester_id,
            "endpoint": r.endpoint,
            "status": r.status,
            "tokens": r.tokens,
            "price_micro_per_token": r.price_micro_per_token,
            "charge_micro": r.charge_micro,
            "reason": r.reason[:400],
            "created_at": r.created_at,
        }
        for r in rows
    ]


# -- queries ----------------------------------------------------------------------------------------


def agents_view(session: Session) -> list[dict[str, Any]]:
    """The first MAX_AGENTS agents by enrollment, with wallet/escrow balances and lease counts by
    verdict ("open": no verdict yet)."""
    rows = session.execute(
        select(AgentRow.agent_id, AgentRow.enrolled_at).order_by(AgentRow.enrolled_at).limit(MAX_AGENTS)
    ).all()
    ids = [agent_id for agent_id, _ in rows]
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    tally = (
        select(LeaseRow.agent_id, VerdictRow.verdict, func.count())
        .outerjoin(VerdictRow, VerdictRow.lease_id == LeaseRow.lease_id)
        .where(LeaseRow.agent_id.in_(ids))
        .group_by(LeaseRow.agent_id, VerdictRow.verdict)
    )
    for agent_id, verdict, n in session.execute(tally):
        counts[agent_id][verdict or "open"] = n
    names = [f"{kind}:{agent_id}" for agent_id in ids for kind in ("wallet", "escrow")]
    held = dict(
        session.execute(select(Account.name, Account.balance_micro).where(Account.name.in_(names))).all()
    )
    return [
        {
            "agent_id": agent_id,
            "enrolled_at": enrolled_at,
            "wallet_micro": held.get(f"wallet:{agent_id}", 0),
            "escrow_micro": held.get(f"escrow:{agent_id}", 0),
            "leases": counts.get(agent_id, {}),
        }
        for agent_id, enrolled_at in rows
    ]


def nodes_view(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(NodeRow.node_id, NodeRow.enrolled_at, NodeRow.last_seen, NodeRow.headroom_j)
        .order_by(NodeRow.node_id)
        .limit(MAX_NODES)
    )
    return [
        {"node_id": n, "enrolled_at": enrolled, "last_seen": seen, "headroom_j": headroom}
        for n, enrolled, seen, headroom in rows
    ]


def recent_leases(session: Session, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` leases, newest first, each with its verdict when it has one."""
    rows = session.execute(
        select(LeaseRow, VerdictRow)
        .outerjoin(VerdictRow, VerdictRow.lease_id == LeaseRow.lease_id)
        .order_by(LeaseRow.issued_at.desc(), LeaseRow.lease_id)
        .limit(limit)
    ).all()
    return [lease_view(lease, verdict) for lease, verdict in rows]


def lease_view(lease: LeaseRow, verdict: VerdictRow | None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "lease_id": lease.lease_id,
        "agent": lease.agent_id,
        "node": lease.node_id,
        "model": _model_of(lease.lease_json),
        "status": lease.status,
        "tier": lease.tier,
        "issued_at": lease.issued_at,
        "verdict": None,
        "final": None,
        "reason": "",
        "layers": [],
        "energy_j": None,
        "charge_micro": None,
        "stake_outcome": None,
        "appraised_at": None,
    }
    if verdict is not None:
        view.update(
            verdict=verdict.verdict,
            final=verdict.final,
            reason=verdict.reason,
            layers=_layers(verdict.layers),
            energy_j=verdict.energy_j,
            charge_micro=verdict.charge_micro,
            stake_outcome=verdict.stake_outcome,
            appraised_at=verdict.appraised_at,
        )
    return view


def balance_series(session: Session, agent_accounts: list[str]) -> list[dict[str, Any]]:
    """Per account (the agents' wallets and escrows, Maxwell's revenue): (time, balance after) for
    each of its entries among the newest MAX_ENTRIES, ending at (now, its balance). Balances are
    rebuilt backwards from the account's current balance, so a window that does not reach back to
    the first entry is still exact."""
    accounts = session.execute(
        select(Account.id, Account.name, Account.kind, Account.balance_micro).where(
            (Account.name.in_(agent_accounts)) | (Account.kind == "revenue")
        )
    ).all()
    by_id = {a.id: a for a in accounts if a.kind in BALANCE_KINDS}
    newest = session.execute(
        select(Entry.account_id, Entry.amount_micro, Transfer.created_at)
        .join(Transfer, Transfer.id == Entry.transfer_id)
        .where(Entry.account_id.in_(list(by_id)))
        .order_by(Entry.id.desc())
        .limit(MAX_ENTRIES)
    ).all()
    now = time.time()
    current = current_balances(session, by_id.values())  # Maxwell's revenue: summed (ledger.summed)
    after = {i: current[a.name] for i, a in by_id.items()}  # walking back: the balance after each entry
    points: dict[int, list[tuple[float, int]]] = {i: [(now, b)] for i, b in after.items()}
    for account_id, amount, created_at in newest:
        points[account_id].append((_unix(created_at), after[account_id]))
        after[account_id] -= amount
    series = []
    for account_id, account in sorted(by_id.items(), key=lambda item: item[1].name):
        ordered = points[account_id][::-1]
        if len(ordered) > 1:  # what it held just before the oldest entry read (0 at its first)
            ordered.insert(0, (ordered[0][0], after[account_id]))
        series.append({"account": account.name, "kind": account.kind, "points": [[t, b] for t, b in ordered]})
    return series


def recent_traces(session: Session, nodes: Keyring) -> list[dict[str, Any]]:
    """Token arrival times and sandbox CPU seconds of the newest MAX_TRACES leases with a receipt,
    from the node-signed evidence as stored (its signature checked again against the enrolled node)."""
    rows = session.execute(
        select(ReceiptRow.lease_id, ReceiptRow.node_id, ReceiptRow.evidence, ReceiptRow.received_at, LeaseRow)
        .join(LeaseRow, LeaseRow.lease_id == ReceiptRow.lease_id)
        .order_by(ReceiptRow.received_at.desc())
        .limit(MAX_TRACES)
    ).all()
    verdicts = dict(
        session.execute(
            select(VerdictRow.lease_id, VerdictRow.verdict).where(
                VerdictRow.lease_id.in_([r[0] for r in rows])
            )
        ).all()
    )
    return [
        trace_view(lease_id, node_id, raw, received_at, lease, verdicts.get(lease_id), nodes)
        for lease_id, node_id, raw, received_at, lease in rows
    ]


def trace_view(
    lease_id: str,
    node_id: str,
    raw: bytes,
    received_at: float,
    lease: LeaseRow,
    verdict: str | None,
    nodes: Keyring,
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "lease_id": lease_id,
        "agent": lease.agent_id,
        "node": node_id,
        "model": _model_of(lease.lease_json),
        "verdict": verdict,
        "received_at": received_at,
    }
    try:
        evidence = open_evidence(raw, nodes).evidence
    except (EvidenceFormatError, UnknownAgentError) as exc:  # e.g. the node's key was since replaced
        return {**view, "error": str(exc), "tokens": 0, "stream_t": [], "stream_cpu_s": []}
    keep = _thinned(len(evidence.stream_t), MAX_TRACE_POINTS)
    return {
        **view,
        "error": None,
        "tokens": len(evidence.stream_t),
        "index": keep,
        "stream_t": [evidence.stream_t[i] for i in keep],
        "stream_cpu_s": [evidence.stream_cpu_s[i] for i in keep if i < len(evidence.stream_cpu_s)],
        "wall_s": evidence.wall_s,
        "cpu_s": evidence.cpu_s,
        "accounting": str(evidence.accounting.get("source", "rusage")),
    }


# -- helpers ----------------------------------------------------------------------------------------


def _snapshot_session(engine: Engine) -> Session:
    """A read-only session on one snapshot. SQLite's read transaction is one already; PostgreSQL's
    default (read committed) would let each query see newer commits, so it reads repeatable."""
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return Session(engine)


def _thinned(n: int, most: int) -> list[int]:
    """Indices 0..n-1, or `most` of them evenly spread with the first and the last kept."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _model_of(lease_json: str) -> str:
    try:
        return str(json.loads(lease_json).get("model_id", ""))
    except (ValueError, AttributeError):
        return ""


def _layers(raw: str) -> list[dict[str, str]]:
    """Each layer's name, status and reason (its details stay out: they can be large)."""
    try:
        layers = json.loads(raw)
        return [
            {"layer": str(x["layer"]), "status": str(x["status"]), "reason": str(x.get("reason", ""))}
            for x in layers
        ]
    except (ValueError, KeyError, TypeError):
        return []


def _unix(moment: datetime) -> float:
    """A transfer's time as unix seconds; SQLite hands back naive datetimes, written in UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


__all__ = ["mount_dashboard", "snapshot"]
