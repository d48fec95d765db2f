"""The lease lifecycle: states are enums, every move is declared (`service.states`), one module
moves leases and their money (`service.settlement`), and a pending lease's audit is queued however
intake was called — here in-process, with no HTTP route in between."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from made_up_intake import PassingInline, made_up_intake, one_lease
from sqlalchemy.orm import Session

import maxwell_poi.service.intake as intake
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.protocol.errors import EvidenceFormatError, EvidenceSignatureError, UnknownAgentError
from maxwell_poi.protocol.result import AttestationResult, LayerName, LayerResult, Status, Verdict
from maxwell_poi.service import ControlPlane, ServiceConfig
from maxwell_poi.service.schema import CompletionRow, LeaseRow, ServiceBase, VerdictRow
from maxwell_poi.service.settlement import completion_outcome, move_lease
from maxwell_poi.service.states import (
    BID_MOVES,
    CHALLENGE_MOVES,
    COMPLETION_MOVES,
    LEASE_MOVES,
    STAKE_MOVES,
    BidState,
    CompletionState,
    LeaseState,
    StakeOutcome,
    TransitionError,
    check_move,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "maxwell_poi"
SETTLEMENT = SRC / "service" / "settlement.py"
LEDGER = SRC / "ledger"
MIGRATIONS = SRC / "service" / "migrations" / "versions"

# -- only settlement moves a lease and its money --------------------------------------------------------

LEASE_MONEY = {
    "hold_energy",
    "escrow_stake",
    "settle_energy",
    "settle_lease",
    "debit_energy",
    "release_stake",
    "slash_stake",
}
STATE_FIELDS = {"status", "stake_outcome"}
STATE_ROWS = {"LeaseRow", "BidRow", "CompletionRow", "VerdictRow"}


def _only_challenge_states(value: ast.expr) -> bool:
    """A status write of a ChallengeState member (either branch of a conditional): the challenge
    mailbox's own states, which move no money."""
    if isinstance(value, ast.IfExp):
        return _only_challenge_states(value.body) and _only_challenge_states(value.orelse)
    return isinstance(value, ast.Attribute) and ast.unparse(value.value) == "ChallengeState"


def lifecycle_writes(source: str) -> list[str]:
    """Where `source` writes a bid, lease, stake or completion state or posts a lease's money:
    `x.status = …` / `x.stake_outcome = …` (not on `self`: an error's own HTTP status), `status=` in
    a row constructor or an `update(…).values(…)`, and the ledger's lease operations or a
    `transfer` of any kind but a deposit."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            for t in flat:
                if not (isinstance(t, ast.Attribute) and t.attr in STATE_FIELDS):
                    continue
                if isinstance(t.value, ast.Name) and t.value.id == "self":
                    continue
                if node.value is not None and _only_challenge_states(node.value):
                    continue
                found.append(f"line {node.lineno}: {ast.unparse(t)} = …")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in STATE_ROWS or name == "values":
                for kw in node.keywords:
                    if kw.arg in STATE_FIELDS and not _only_challenge_states(kw.value):
                        found.append(f"line {node.lineno}: {name}({kw.arg}=…)")
            if isinstance(func, ast.Attribute) and name in LEASE_MONEY:
                found.append(f"line {node.lineno}: .{name}(…)")
            if isinstance(func, ast.Attribute) and name in ("transfer", "post_in"):
                kind = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(kind, ast.Constant) and kind.value == "deposit"):
                    found.append(f"line {node.lineno}: .{name}(…) of a lease's money")
    return found


def test_the_checker_finds_each_kind_of_write() -> None:
    """The inspection below is only as good as this: every shape of write it must catch, caught."""
    snippet = """
row.status = LeaseState.SETTLED
bid.status, bid.reason = "refused", "why"
current.stake_outcome = outcome
session.add(LeaseRow(lease_id=x, status="pulled"))
session.execute(update(LeaseRow).values(status=status))
ledger.release_stake(agent, lease_id, session=session)
self.ledger.hold_energy(agent, lease_id, 10)
ledger.transfer(f"pay:{lease_id}", "other", legs, lease_id=lease_id)
"""
    assert len(lifecycle_writes(snippet)) == 8, lifecycle_writes(snippet)
    allowed = """
self.status = status
row.status = ChallengeState.LATE if late else ChallengeState.ANSWERED
session.execute(update(ChallengeRow).values(status=ChallengeState.LATE))
ledger.transfer(f"deposit:{key}", "deposit", legs, memo="")
if row.status == LeaseState.EXPIRED: pass
"""
    assert lifecycle_writes(allowed) == []


def test_only_settlement_writes_lease_states_and_moves_lease_money() -> None:
    offenders = {
        str(path.relative_to(SRC)): writes
        for path in sorted(SRC.rglob("*.py"))
        if path != SETTLEMENT and LEDGER not in path.parents
        if (writes := lifecycle_writes(path.read_text()))
    }
    assert offenders == {}, f"lease states or lease money moved outside service/settlement.py: {offenders}"
    assert len(lifecycle_writes(SETTLEMENT.read_text())) >= 10  # and settlement does move them


# -- declared moves ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moves", "current", "target"),
    [
        (LEASE_MOVES, LeaseState.PULLED, LeaseState.AUDIT_PENDING),
        (LEASE_MOVES, LeaseState.PULLED, LeaseState.SETTLED),
        (LEASE_MOVES, LeaseState.PULLED, LeaseState.EXPIRED),
        (LEASE_MOVES, LeaseState.PULLED, LeaseState.FAILED),  # no receipt: the agent never started
        (LEASE_MOVES, LeaseState.AUDIT_PENDING, LeaseState.SETTLED),
        (BID_MOVES, BidState.OPEN, BidState.WON),
        (STAKE_MOVES, StakeOutcome.PENDING, StakeOutcome.SLASHED),
        (COMPLETION_MOVES, CompletionState.STREAMING, CompletionState.PAID),
    ],
)
def test_a_declared_move_passes(moves, current, target) -> None:  # noqa: ANN001
    check_move("x", moves, current, target)


@pytest.mark.parametrize(
    ("moves", "current", "target"),
    [
        (LEASE_MOVES, LeaseState.SETTLED, LeaseState.PULLED),  # a settled lease never runs again
        (LEASE_MOVES, LeaseState.EXPIRED, LeaseState.SETTLED),  # an expired lease takes no receipt
        (LEASE_MOVES, LeaseState.AUDIT_PENDING, LeaseState.EXPIRED),  # its receipt is in: no refund
        (LEASE_MOVES, LeaseState.SETTLED, LeaseState.SETTLED),
        (LEASE_MOVES, LeaseState.FAILED, LeaseState.SETTLED),  # a failed lease is never judged later
        (LEASE_MOVES, LeaseState.AUDIT_PENDING, LeaseState.FAILED),  # a receipt in: not a failed lease
        (BID_MOVES, BidState.WON, BidState.OPEN),
        (BID_MOVES, BidState.REFUSED, BidState.WON),
        (STAKE_MOVES, StakeOutcome.RELEASED, StakeOutcome.SLASHED),  # released money is not slashed later
        (COMPLETION_MOVES, CompletionState.REFUNDED, CompletionState.PAID),
        (CHALLENGE_MOVES, "late", "answered"),
    ],
)
def test_an_undeclared_move_raises_naming_the_declared_ones(moves, current, target) -> None:  # noqa: ANN001
    with pytest.raises(TransitionError, match=f"a move to {target} from .*got one from {current}"):
        check_move("x", moves, current, target)


def test_the_check_constraints_are_the_enums_and_the_migrations_agree() -> None:
    """Each CHECK constraint of the models lists its enum's values exactly as the migrations wrote
    them (0001 as a tuple of strings, 0002, 0003 and 0005 as SQL): an existing database stays valid."""
    migrated = "\n".join(p.read_text() for p in MIGRATIONS.glob("*.py"))
    enums = {"cp_bids": BidState, "cp_leases": LeaseState, "cp_completions": CompletionState}
    checked = 0
    for table in ServiceBase.metadata.tables.values():
        for constraint in table.constraints:
            match = re.fullmatch(r"(\w+) IN \((.*)\)", str(getattr(constraint, "sqltext", "")))
            if match is None:
                continue
            column, listed = match.groups()
            values = re.findall(r"'(\w+)'", listed)
            assert listed == ", ".join(f"'{v}'" for v in values), listed  # plain strings, no enum reprs
            if column == "status" and table.name in enums:
                assert values == [m.value for m in enums[table.name]]
            sql, python = f"{column} IN ({listed})", ", ".join(f'"{v}"' for v in values)
            assert sql in migrated or f"({python})" in migrated, f"{table.name}: {listed} not migrated"
            checked += 1
    assert checked == 7


def test_refusal_status_is_chosen_by_error_type() -> None:
    signature = EvidenceSignatureError("a signature by enrolled node 'n1'", "one that does not verify")
    assert intake.refusal_status(signature) == 403
    assert intake.refusal_status(EvidenceFormatError("a DSSE envelope", "garbage")) == 422
    assert intake.refusal_status(UnknownAgentError("rogue", [])) == 403
    assert intake.refusal_status(TransitionError("lease x", "a move to settled", "one from expired")) == 409


def test_a_completion_is_paid_only_for_a_final_affirming_verdict() -> None:
    def verdict(v: Verdict, final: bool) -> VerdictRow:
        return VerdictRow(verdict=v, final=final)

    assert completion_outcome(verdict(Verdict.AFFIRMING, True), cut=False) is CompletionState.PAID
    assert completion_outcome(verdict(Verdict.AFFIRMING, False), cut=False) is CompletionState.REFUNDED
    assert completion_outcome(verdict(Verdict.CONTRAINDICATED, True), cut=True) is CompletionState.CUT
    assert completion_outcome(None, cut=False) is CompletionState.REFUNDED
    assert CompletionRow(status=CompletionState.PAID).status == "paid"  # stored as its plain string


def test_a_result_derives_its_verdict_from_its_layers() -> None:
    layers = (
        LayerResult(LayerName.INTEGRITY, Status.PASS, "ok"),
        LayerResult(LayerName.AUDIT, Status.WARN, "?"),
    )
    result = AttestationResult("l", "a", "m", layers)
    assert result.verdict is Verdict.WARNING
    again = AttestationResult.from_dict(result.as_dict())
    assert again.as_dict() == result.as_dict() and again.as_dict()["verdict"] == "warning"


# -- in-process intake: the audit is queued and run --------------------------------------------------------


@pytest.fixture()
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    config = ServiceConfig.from_env(db=str(tmp_path / "cp.sqlite"), admin_token="t", reserve_micro_per_j=20)
    cp = ControlPlane(config)
    cp.start()
    yield cp
    cp.close()


def test_in_process_intake_queues_its_audit_and_the_workers_finalise_it(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp, node_key = plane, NodeKey.generate()
    pulled = one_lease(cp, node_key)
    lease_id = pulled.lease.lease_id
    assert pulled.tier != "exact"  # the exact tier's worker polls the database; L4's waits to be queued
    monkeypatch.setattr(cp.intake, "verifier", PassingInline())
    monkeypatch.setattr(intake, "draw_audit", lambda _p: True)

    answer, _result = cp.intake.submit(
        made_up_intake(lease_id, node_key)
    )  # not through the HTTP route: settlement must queue the audit itself
    assert (answer.final, answer.audit_drawn, answer.stake_outcome) == (False, True, "pending")
    assert cp.audits.drain(60), "the drawn audit stayed pending: nobody queued it"
    with Session(cp.ledger.engine) as session:
        row, verdict = session.get(LeaseRow, lease_id), session.get(VerdictRow, lease_id)
    assert (row.status, verdict.final) == (LeaseState.SETTLED, True)
    # the workers' L0 re-read the receipt and refused it: the stand-in's pass did not survive the audit
    assert (verdict.verdict, verdict.stake_outcome) == (Verdict.CONTRAINDICATED, StakeOutcome.SLASHED)
    assert cp.ledger.balances()["maxwell:slashed"] == 100_000
    with (
        cp.ledger.session() as session,
        session.begin(),
        pytest.raises(TransitionError, match="from settled"),
    ):
        move_lease(session, lease_id, LeaseState.AUDIT_PENDING)  # settled is final, in the database too
