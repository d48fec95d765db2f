"""Bad input, at scale: the control plane's HTTP API fuzzed from its own OpenAPI spec (schemathesis)
and every parser it runs on what arrives fuzzed directly (hypothesis). The bar: no crash, no 5xx,
and every 4xx answered `{"error": {status, expected, got, message}}` with a non-empty `expected`.

    make bench-service-fuzz           # >= 100,000 cases; merges its keys into bench/results/service.json
    python -m bench.service.fuzz --cases 5000 --max-seconds 120 --no-write

A case is one generated request sent to the app, or one generated input handed to a parser. The
plane is seeded (agents alice, bob, carol; nodes n1, pool; money; leases open, settled and another
agent's), and signed routes are fuzzed mostly WITH a valid signature over the generated request,
so bodies reach the market, the ledger and intake instead of stopping at 401; the baseline receipt and
evidence pass L0-L2 (a hand-made resident profile), so their fuzzed variants reach the layers' sums and
the audit workers. A server error is a 5xx, an exception out of the app or out of an audit worker, or an
unexpected exception out of a parser (it would be a 500).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from securesystemslib.dsse import Envelope
from starlette.datastructures import URL

from bench.common.results import RESULTS_DIR, write_results  # noqa: E402
from maxwell_poi.gateway import Gateway, mount_gateway
from maxwell_poi.node.attest import EVIDENCE_PAYLOAD_TYPE, EVIDENCE_PREDICATE, NodeKey, open_evidence
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol import errors
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.receipt import (
    PAYLOAD_TYPE,
    STATEMENT_TYPE,
    claims_for_lease,
    fingerprint_size,
    open_receipt,
    statement_for,
    token_output,
)
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig, wire
from maxwell_poi.service.api import create_app
from maxwell_poi.service.auth import check_admin, sign_request, verify_request
from maxwell_poi.service.errors import ApiError
from maxwell_poi.service.intake import pending_audits
from maxwell_poi.service.suspension import suspension

RESULTS = RESULTS_DIR / "service.json"
WRITES = {
    "service.json": [
        "fuzz_cases",
        "fuzz_server_errors",
        "fuzz_refusals_without_reason",
        "fuzz_by_target",
        "fuzz_seconds",
        "fuzz_command",
    ]
}  # bench/common/results.py
ADMIN_TOKEN = "fuzz-admin-token"
MODEL = "gpt2-micro"
BASE = "http://testserver"
SIGNED = {
    "/v1/bids": "agent",
    "/v1/agent/": "agent",
    "/v1/node/pull": "node",
    "/v1/node/openings": "node",
    "/v1/node/stream/": "node",
}
RUN = settings(database=None, deadline=None, phases=[Phase.generate], verbosity=Verbosity.quiet,
               suppress_health_check=list(HealthCheck))  # fmt: skip

# -- arbitrary JSON, and edits of a valid document -----------------------------------------------------

DELETE = object()  # an edit that removes the key instead of replacing its value
EDGES = [None, True, 0, -1, 2**63, -(2**63) - 1, 10**400, 1e308, float("inf"), float("nan"), "", "\x00", []]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=24),
                    st.sampled_from(EDGES))  # fmt: skip
KEYS = st.text(max_size=9)
JSON = st.recursive(SCALARS, lambda k: st.lists(k, max_size=4) | st.dictionaries(KEYS, k, max_size=4))


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into nested dicts and lists (the root too)."""
    out = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value if isinstance(value, list) else [])
    for key, sub in items:
        out += paths_of(sub, (*prefix, key))
    return out


def mutations(template: Any, favour: tuple = ()) -> st.SearchStrategy[list]:
    """Up to three (path, new value or DELETE) edits of a document shaped like `template`; shallow
    paths and those under `favour` drawn more often (a document's shape breaks parsers first)."""
    weight = lambda p: max(1, 4 - len(p)) + 3 * (p[: len(favour)] == favour)  # noqa: E731
    paths = [p for p in paths_of(template) for _ in range(weight(p))]
    return st.lists(st.tuples(st.sampled_from(paths), JSON | st.just(DELETE)), max_size=3)


def apply(base: Any, edits: list) -> Any:
    """`base` with `edits` made, each where its path still leads (an earlier edit may have cut it)."""
    out = copy.deepcopy(base)
    for path, value in edits:
        if not path:
            out = None if value is DELETE else copy.deepcopy(value)
            continue
        parent = out
        for key in path[:-1]:
            parent = parent[key] if _has(parent, key) else None
        if _has(parent, path[-1]) and value is DELETE and isinstance(parent, dict):
            del parent[path[-1]]
        elif _has(parent, path[-1]):
            parent[path[-1]] = None if value is DELETE else copy.deepcopy(value)
    return out


def _has(parent: Any, key: Any) -> bool:
    if isinstance(parent, dict):
        return isinstance(key, str) and key in parent
    return isinstance(parent, list) and isinstance(key, int) and key < len(parent)


# -- what was found ------------------------------------------------------------------------------------


@dataclass
class Tally:
    cases: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)  # per target, generation included
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0
    refusals_without_reason: int = 0
    unsendable: int = 0  # requests httpx could not put on the wire: not sent, not counted as cases
    ledger: dict[str, Any] = field(default_factory=dict)  # check_ledger's report after the run
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)  # one per bug: its first input

    def found(self, target: str, kind: str, what: str, detail: str, signature: str) -> None:
        if kind == "refusal without reason":
            self.refusals_without_reason += 1
        else:
            self.server_errors += 1
        entry = self.findings.setdefault(f"{target} | {kind} | {signature}", {"count": 0})
        entry["count"] += 1
        entry.setdefault("input", what[:4000])
        entry.setdefault("detail", detail[-6000:])

    def report(self) -> str:
        return "\n\n".join(f"{k} (x{f['count']})\n  input: {f['input']}\n  {f['detail']}"
                           for k, f in self.findings.items())  # fmt: skip


def crash_signature(exc: BaseException) -> str:
    """Exception type and the innermost maxwell_poi function it came out of: one finding per bug."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "maxwell_poi" in f.filename]
    where = f"{Path(frames[-1].filename).stem}.{frames[-1].name}" if frames else "outside maxwell_poi"
    return f"{type(exc).__name__} in {where}"


def refusal_problem(status: int, body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"status", "expected", "got", "message"} <= set(error):
        return "no {error: {status, expected, got, message}} body"
    if not isinstance(error["expected"], str) or not error["expected"].strip():
        return "an empty expected"
    return f"error.status {error['status']!r} on an HTTP {status}" if error["status"] != status else None


class AuditCrashes(logging.Handler):
    """What the audit workers log as failed: an audit runs after intake answered, so no HTTP status
    shows its crash; the worker logs it and leaves the lease pending."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.leases: set[str] = set()  # whose audit crashed: they stay pending for good

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.leases.update(str(a) for a in (record.args if isinstance(record.args, tuple) else ()))

    def drain(self, tally: Tally) -> None:
        while self.records:
            record = self.records.pop(0)
            exc = record.exc_info[1] if record.exc_info else None
            detail = "".join(traceback.format_exception(exc)) if exc else record.getMessage()
            signature = crash_signature(exc) if exc else "an error logged"
            tally.found("audit_workers", "crash", record.getMessage(), detail, signature)


# -- the seeded control plane ------------------------------------------------------------------------


class Plane:
    """A control plane over a fresh database behind a TestClient: parties enrolled, money deposited,
    and leases in each state the agent routes tell apart."""

    def __init__(self, workdir: Path) -> None:
        ProfileStore().put(_resident_profile())  # so L1 and L2 judge the fuzzed evidence, not skip it
        config = ServiceConfig.from_env(db=str(workdir / "cp.sqlite"), admin_token=ADMIN_TOKEN)
        self.control = ControlPlane(config)
        self.ref = self.control.registry.reference(MODEL)  # L0's reference values (builds the model once)
        self.audit_crashes = AuditCrashes()
        logging.getLogger("maxwell_poi.service.audits").addHandler(self.audit_crashes)
        self.control.start()
        self.app = create_app(self.control)
        mount_gateway(self.app, Gateway(self.control))  # the OpenAI routes are fuzzed too
        self.http = TestClient(self.app, raise_server_exceptions=True)  # an app exception is a finding
        self.http.__enter__()  # one event-loop portal for the whole run
        self.keys = {f"agent:{a}": AgentKey.generate() for a in ("alice", "bob", "carol")}
        self.keys |= {f"node:{n}": NodeKey.generate() for n in ("n1", "pool")}
        self.keys["stranger"] = NodeKey.generate()  # never enrolled
        admin = ServiceClient(BASE, admin_token=ADMIN_TOKEN, http=self.http)
        client = lambda p: ServiceClient(BASE, key=self.keys[p], principal=p, http=self.http)  # noqa: E731
        self.client = {p: client(p) for p in self.keys}
        self.admin = admin
        for principal, key in self.keys.items():
            role, _, name = principal.partition(":")
            if role == "node":
                admin.enroll_node(name, key.public_hex)
            elif role == "agent":
                admin.enroll_agent(name, key.public_hex, ["true"])
                admin.deposit(name, 10**13, f"seed-{name}")
        for agent, bid in (("alice", "seed-1"), ("alice", "seed-2"), ("bob", "seed-3")):
            self.client[f"agent:{agent}"].bid(_bid(bid))
        pulled = [p.lease for p in self.client["node:n1"].pull(1e9, ["alice", "bob"], 8).leases]
        self.lease_json = {lease["lease_id"]: lease for lease in pulled}
        alices = [lease["lease_id"] for lease in pulled if lease["agent_id"] == "alice"]
        bobs = next(lease["lease_id"] for lease in pulled if lease["agent_id"] == "bob")
        self.leases = {"settled": alices[0], "open": alices[1], "bob": bobs}
        receipt = b"not a receipt"  # L0 refuses it: a contraindicated, final verdict to read and dispute
        evidence = self.evidence(self.statement(self.lease_json[alices[0]], receipt, "n1"), "node:n1")
        self.client["node:n1"].intake(alices[0], receipt, evidence)
        self.pool: list[dict] = []  # carol's leases on node `pool`, for intake cases that may settle one
        self.used: set[str] = set()

    def close(self) -> None:
        self.http.__exit__(None, None, None)
        self.control.close()
        logging.getLogger("maxwell_poi.service.audits").removeHandler(self.audit_crashes)

    def statement(self, lease: dict, receipt: bytes, node: str, lease_id: str = "") -> dict[str, Any]:
        """The in-toto Statement a node signs over one lease's receipt (observer.attest's shape), its
        evidence that of an honest resident run of a receipt from `receipt_statement`."""
        lease_id = lease_id or lease["lease_id"]
        sent = Lease.model_validate(lease).to_json().encode() + b"\n"
        n = lease["job"]["max_new_tokens"]
        evidence = LeaseEvidence(
            started_at=time.time() - 1, finished_at=time.time(), wall_s=0.02 * n, cpu_s=0.011 * n + 0.01,
            max_rss_kb=250_000, bytes_in=len(sent), bytes_out=len(receipt) + 30 * n, sha256_in=_sha(sent),
            sha256_out=_sha(receipt), exit_code=None, receipt_bytes=len(receipt), stream_tokens=(1,) * n,
            stream_t=tuple(0.01 * i for i in range(n)), stream_cpu_s=tuple(0.011 * i for i in range(n)),
            device_class=this_device(), regime="resident", accounting={"source": "cgroup-v1"},
        )  # fmt: skip
        subject = [{"name": f"lease/{lease_id}/receipt", "digest": {"sha256": _sha(receipt)}}]
        predicate = {"node": node, "hardware": {"cores": "2"}, "sandbox": {"source": "cgroup-v1"},
                     "lease_id": lease_id, "evidence": evidence.as_dict()}  # fmt: skip
        return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": EVIDENCE_PREDICATE,
                "predicate": predicate}  # fmt: skip

    def evidence(self, statement: Any, signer: str) -> bytes:
        return _dsse(json.dumps(statement).encode(), EVIDENCE_PAYLOAD_TYPE, self.keys.get(signer))

    def receipt_statement(self, lease: dict) -> dict[str, Any]:
        """A receipt statement for `lease` that L0 accepts (right bindings, sizes and weights digest;
        its tokens and fingerprints are zeros, which only L4 would find out)."""
        parsed = Lease.model_validate(lease)
        output = token_output([1] * parsed.job.max_new_tokens, self.ref.vocab)
        fingerprints = bytes(fingerprint_size(parsed))
        claims = claims_for_lease(parsed, self.ref.weights_digest, output, fingerprints, "cd" * 32)
        return statement_for(claims)

    def receipt(self, statement: Any, signer: str) -> bytes:
        return _dsse(json.dumps(statement).encode(), PAYLOAD_TYPE, self.keys.get(signer))

    def fresh_lease(self) -> dict:
        """A lease of carol's on node `pool` with no receipt yet (reused until a case settles it or
        its deadline nears: a long run outlives the 600 s lease lifetime)."""
        self.pool = [lease for lease in self.pool if lease["deadline"] > time.time() + 60]
        while not self.pool:
            with self.control.ledger.session() as session:
                suspended = suspension(session, "carol")
            if suspended is not None:
                # intake cases that send a failed run's evidence fail carol's pool leases, and three
                # in a row suspend her (a long run reached it): re-enrolled, as an operator would
                self.admin.enroll_agent("carol", self.keys["agent:carol"].public_hex, ["true"])
            for i in range(16):
                self.client["agent:carol"].bid(_bid(f"pool-{time.time_ns()}-{i}"))
            pulled = self.client["node:pool"].pull(1e9, ["carol"], 16).leases
            self.pool = [p.lease for p in pulled if p.lease["lease_id"] not in self.used]
        return self.pool[0]

    def wait_for_audits(self, timeout_s: float = 120.0) -> None:
        """Until every drawn audit has finished or crashed (AuditWorkers.drain waits on crashed ones)."""
        deadline = time.monotonic() + timeout_s
        waiting = lambda: set(pending_audits(self.control.ledger)) - self.audit_crashes.leases  # noqa: E731
        while waiting() and time.monotonic() < deadline:
            time.sleep(0.05)

    def settled(self, lease_id: str) -> None:
        self.used.add(lease_id)
        self.pool = [lease for lease in self.pool if lease["lease_id"] != lease_id]

    def send(self, tally: Tally, target: str, method: str, url: str, *, params: Any = None,
             headers: dict | None = None, body: bytes = b"", auth: str = "none") -> int | None:  # fmt: skip
        """One request, signed as `auth` ("agent:alice", "admin", "stale:node:n1", "none") over the
        path and query the server rebuilds (Starlette's request.url); what is wrong goes to `tally`."""
        try:
            request = self.http.build_request(method, url, params=params, content=body, headers=headers)
        except Exception:  # a header or URL httpx cannot put on the wire: no request, no case
            tally.unsendable += 1
            return None
        if auth == "admin":
            request.headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
        elif (principal := auth.removeprefix("stale:")) in self.keys:
            scope = {"type": "http", "path": unquote(request.url.path), "query_string": request.url.query,
                     "headers": [], "server": ("testserver", 80)}  # fmt: skip
            seen = URL(scope=scope)
            signed_path = seen.path + (f"?{seen.query}" if seen.query else "")
            now = time.time() - (3600 if auth.startswith("stale:") else 0)
            key = self.keys[principal]
            request.headers.update(sign_request(key, principal, method, signed_path, body, now))
        tally.cases[target] += 1
        what = f"{method} {request.url} headers={dict(request.headers)!r} body={body[:3000]!r}"
        try:
            response = self.http.send(request)
        except Exception as exc:
            tally.found(target, "crash", what, traceback.format_exc(), crash_signature(exc))
            return None
        tally.statuses[response.status_code] += 1
        if response.status_code >= 500:
            tally.found(target, "5xx", what, response.text, f"HTTP {response.status_code}")
        elif response.status_code >= 400:
            try:
                decoded = response.json()
            except ValueError:
                decoded = response.text
            if problem := refusal_problem(response.status_code, decoded):
                tally.found(target, "refusal without reason", what, response.text[:2000], problem)
        return response.status_code


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bid(bid_id: str) -> dict[str, Any]:
    job = {"kind": "generate", "prompt": "hi there", "max_new_tokens": 4}
    return {"bid_id": bid_id, "model_id": MODEL, "job": job, "price_micro_per_j": 100, "stake_micro": 1000}


def _resident_profile() -> Profile:
    """A hand-made resident profile of the model on this device (numbers of a small model's order)."""
    peak = {"peak_flops_per_s": 2e10, "peak_flops_per_cpu_s": 2e10}
    per_batch = {"1": Stats.of([0.01, 0.012]), "2": Stats.of([0.006, 0.007])}
    runs = dict(intervals=[0.01, 0.012], cpu_per_token=[0.01, 0.012], busy=[1.0, 1.1], memory=[200, 210])
    device = f"{this_device()}|resident"
    return Profile.from_runs(device, MODEL, 8, **runs, peak=peak, measured_at=time.time(), regime="resident",
                             batch_cpu_s_per_token=per_batch)  # fmt: skip


def _dsse(payload: bytes, payload_type: str, key: AgentKey | None) -> bytes:
    envelope = Envelope(payload=payload, payload_type=payload_type, signatures={})
    if key is not None:
        envelope.sign(key.signer)
    return json.dumps(envelope.to_dict()).encode()


# -- HTTP targets --------------------------------------------------------------------------------------

AUTH_VARIANTS = ["right"] * 5 + ["other-agent", "other-role", "stale", "as-generated"]
LEASE_PICKS = ["generated", "generated", "open", "settled", "bob"]


def openapi_strategy(plane: Plane, negative: bool) -> st.SearchStrategy:
    """(case, auth variant, lease pick, known ids?): a schemathesis case of any operation of the spec."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", plane.app)
    mode = schemathesis.GenerationMode.NEGATIVE if negative else schemathesis.GenerationMode.POSITIVE
    ops = [r.ok() for r in schema.get_all_operations()]
    # a path parameter alone cannot be made invalid against `string`: negative needs a body or a query
    ops = [op for op in ops if not negative or op.body or op.query]
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in ops])
    return st.tuples(cases, st.sampled_from(AUTH_VARIANTS), st.sampled_from(LEASE_PICKS), st.booleans())


def openapi_case(plane: Plane, tally: Tally, target: str, drawn: tuple) -> None:
    case, variant, lease_pick, known_ids = drawn
    path = case.operation.path
    if "lease_id" in (case.path_parameters or {}) and lease_pick != "generated":
        case.path_parameters["lease_id"] = plane.leases[lease_pick]
    if known_ids and isinstance(case.body, dict):  # ids the plane knows, so the body gets past lookups
        known = {"model_id": MODEL, "agent_id": "alice", "agents": ["alice"]}
        case.body.update({k: v for k, v in known.items() if k in case.body})
    kw = case.as_transport_kwargs(base_url=BASE)
    data = json.dumps(kw["json"]).encode() if "json" in kw else kw.get("data") or b""
    body = data.encode() if isinstance(data, str) else bytes(data)
    headers = {k: v for k, v in kw.get("headers", {}).items() if k.lower() != "content-length"}
    role = next((r for prefix, r in SIGNED.items() if path.startswith(prefix)), None)
    own = "agent:alice" if role == "agent" else "node:n1"
    other_role = "node:n1" if role == "agent" else "agent:alice"
    variants = {"right": own, "other-agent": "agent:bob", "other-role": other_role, "stale": f"stale:{own}"}
    auth = variants.get(variant)
    if path.startswith("/v1/admin/"):
        auth = "none" if variant == "as-generated" else "admin"
    elif role is None or auth is None:
        auth = "none"
    params = kw.get("params")
    plane.send(tally, target, kw["method"], kw["url"], params=params, headers=headers, body=body, auth=auth)


INTAKE_LEASES = ["fresh"] * 6 + ["settled", "other-node", "unknown"]
RECEIPTS = ["signed-claims"] * 3 + ["text", "unsigned-claims"]
NODE_SIGNERS = ["node:pool"] * 6 + ["node:n1", "stranger", "none"]


def intake_strategy(plane: Plane) -> st.SearchStrategy:
    """Fuzzed node-signed evidence and a fuzzed receipt for a real lease, straight to intake."""
    lease = plane.lease_json[plane.leases["open"]]
    statement = plane.statement(lease, b"x", "pool")
    return st.tuples(
        st.sampled_from(INTAKE_LEASES), st.sampled_from(RECEIPTS), st.text(max_size=200),
        mutations(plane.receipt_statement(lease), ("predicate",)),
        mutations(statement, ("predicate", "evidence")), st.sampled_from(NODE_SIGNERS),
    )  # fmt: skip


def intake_case(plane: Plane, tally: Tally, target: str, drawn: tuple) -> None:
    pick, receipt_kind, text, receipt_edits, evidence_edits, signer = drawn
    lease = plane.lease_json[plane.leases["settled"]] if pick == "settled" else plane.fresh_lease()
    lease_id = "f" * 32 if pick == "unknown" else lease["lease_id"]
    if receipt_kind == "text":
        receipt = text.encode()
    else:
        statement = apply(plane.receipt_statement(lease), receipt_edits)
        receipt = plane.receipt(statement, "agent:carol" if receipt_kind == "signed-claims" else "none")
    signer = "node:n1" if pick == "other-node" else signer
    node = signer.partition(":")[2] or signer
    evidence = plane.evidence(apply(plane.statement(lease, receipt, node, lease_id), evidence_edits), signer)
    body = json.dumps({"lease_id": lease_id, "receipt": receipt.decode(), "evidence": evidence.decode()})
    headers = {"content-type": "application/json"}
    if plane.send(tally, target, "POST", "/v1/node/intake", headers=headers, body=body.encode()) == 200:
        plane.settled(lease_id)


# -- parser targets --------------------------------------------------------------------------------


def guarded(tally: Tally, target: str, what: Any, call: Callable[[], Any], refusals: tuple) -> None:
    """One parser case: it may answer or refuse with one of `refusals` saying what it expected."""
    tally.cases[target] += 1
    try:
        call()
    except refusals as exc:
        if not str(getattr(exc, "expected", str(exc))).strip():
            tally.found(target, "refusal without reason", repr(what), repr(exc), type(exc).__name__)
    except Exception as exc:
        tally.found(target, "crash", repr(what), traceback.format_exc(), crash_signature(exc))


BODIES = {
    wire.IntakeBody: {"lease_id": "a" * 32, "receipt": "r", "evidence": "e"},
    wire.BidBody: _bid("b") | {"precision": "bf16"},
    wire.PullBody: {"headroom_j": 10.0, "agents": ["alice"], "max_leases": 4},
    wire.EnrollAgent: {"agent_id": "a", "public_key": "ab" * 32, "command": ["x"]},
    wire.Deposit: {"agent_id": "a", "amount_micro": 5, "key": "k"},
    wire.PolicyBody: dict(medium_from_value=1, high_from_value=2, audit_cost_fraction=0.1,
                          upgrade_headroom_factor=2, margin=0),
    wire.DisputeBody: {"statement": "s"},
}  # fmt: skip
PRINCIPALS = st.sampled_from(["agent:alice", "node:n1", "agent:ghost", "agent:", ":"]) | st.text(max_size=9)
STAMPS = st.sampled_from(["nan", "inf", "1e400", "0x10", "1_0"]) | st.floats().map(str) | st.text(max_size=9)
SIGNATURES = st.text("0123456789abcdef", max_size=130) | st.text(max_size=20)
AUTH_HEADERS = st.fixed_dictionaries({"x-poi-principal": PRINCIPALS, "x-poi-timestamp": STAMPS,
                                      "x-poi-signature": SIGNATURES})  # fmt: skip
TAMPER = ["random", "valid", "method", "path", "body", "timestamp", "principal"]


def wire_case(tally: Tally, target: str, drawn: tuple) -> None:
    model, edits = drawn
    doc = apply(BODIES[model], edits)
    guarded(tally, target, (model.__name__, doc), lambda: model.model_validate(doc), (ValidationError,))
    raw = json.dumps(doc).encode()
    guarded(tally, target, (model.__name__, raw), lambda: model.model_validate_json(raw), (ValidationError,))


def auth_case(plane: Plane, tally: Tally, target: str, drawn: tuple) -> None:
    """verify_request on random headers, and on signed requests with one thing changed after signing
    (must be refused 401) or none (must verify); check_admin on whatever a header can carry."""
    head, method, path, body, tamper, authorization = drawn
    now = time.time()
    if tamper != "random":
        head = sign_request(plane.keys["agent:alice"], "agent:alice", method, path, body, now)
        method, path, body, head = _tamper(tamper, method, path, body, head)
    rings = {"agent": plane.control.agents, "node": plane.control.nodes}
    what = (head, method, path, body, tamper)
    verify = lambda: _verify_expecting(tamper == "valid", head, method, path, body, rings, now)  # noqa: E731
    guarded(tally, target, what, verify, ())
    latin1 = authorization.encode("latin-1", "replace").decode("latin-1")
    guarded(tally, target, latin1, lambda: check_admin(latin1, ADMIN_TOKEN), (ApiError,))


def _verify_expecting(valid: bool, head: dict, method: str, path: str, body: bytes, rings: dict,
                      now: float) -> None:  # fmt: skip
    try:
        verify_request(head, method, path, body, rings, 60.0, now=lambda: now)
    except ApiError as exc:
        if valid or exc.status != 401 or not exc.expected.strip():
            what = "a valid request refused" if valid else "a bad refusal"
            raise AssertionError(f"{what}: {exc.body()}") from exc
        return
    if not valid:
        raise AssertionError("a forged or random request verified")


def _tamper(how: str, method: str, path: str, body: bytes, head: dict) -> tuple:
    stamp = f"{float(head['x-poi-timestamp']) + 1:.3f}"
    changed = {"timestamp": {"x-poi-timestamp": stamp}, "principal": {"x-poi-principal": "agent:bob"}}
    method = "DELETE" if how == "method" else method
    return method, path + "x" * (how == "path"), body + b"!" * (how == "body"), head | changed.get(how, {})


def parser_targets(plane: Plane) -> dict[str, tuple[st.SearchStrategy, Callable]]:
    lease = plane.lease_json[plane.leases["open"]]
    evidence_doc, receipt_doc = plane.statement(lease, b"x", "n1"), plane.receipt_statement(lease)
    signers = st.sampled_from(["node:n1", "stranger", "none"])
    signed_evidence = st.tuples(mutations(evidence_doc), signers).map(
        lambda d: plane.evidence(apply(evidence_doc, d[0]), d[1]))  # fmt: skip
    signed_receipt = mutations(receipt_doc).map(lambda d: plane.receipt(apply(receipt_doc, d), "agent:alice"))
    lease_doc = mutations(lease).map(lambda d: json.dumps(apply(lease, d)))
    texts = st.text(max_size=300) | st.binary(max_size=300)
    requests = st.tuples(AUTH_HEADERS, st.sampled_from(["GET", "POST", "PUT"]), st.text(max_size=40),
                         st.binary(max_size=60), st.sampled_from(TAMPER), st.text(max_size=60))  # fmt: skip
    nodes = plane.control.nodes

    def parse(call: Callable, *refusals: type) -> Callable:
        return lambda tally, target, raw: guarded(tally, target, raw, lambda: call(raw), refusals)

    bodies = st.sampled_from(list(BODIES)).flatmap(lambda m: st.tuples(st.just(m), mutations(BODIES[m])))
    refused, receipt_no = (errors.EvidenceFormatError, errors.UnknownAgentError), errors.ReceiptFormatError
    return {
        "parse_wire_bodies": (bodies, wire_case),
        "parse_open_evidence": (texts | signed_evidence, parse(lambda r: open_evidence(r, nodes), *refused)),
        "parse_open_receipt": (texts | signed_receipt, parse(lambda r: open_receipt(r, 1 << 20), receipt_no)),
        "parse_lease_json": (texts | lease_doc, parse(Lease.from_json, errors.LeaseFormatError)),
        "parse_auth_headers": (requests, lambda tally, target, drawn: auth_case(plane, tally, target, drawn)),
    }  # fmt: skip


# -- running ----------------------------------------------------------------------------------------


class OutOfTime(BaseException):
    """Raised inside a hypothesis run when time is up (a BaseException: hypothesis lets it through)."""


def all_targets(plane: Plane) -> dict[str, tuple[st.SearchStrategy, Callable]]:
    def http(case: Callable) -> Callable:
        return lambda tally, target, drawn: case(plane, tally, target, drawn)

    return {
        "http_openapi_positive": (openapi_strategy(plane, negative=False), http(openapi_case)),
        "http_openapi_negative": (openapi_strategy(plane, negative=True), http(openapi_case)),
        "http_intake_signed_evidence": (intake_strategy(plane), http(intake_case)),
    } | parser_targets(plane)


def run_target(tally: Tally, name: str, target: tuple, examples: int, *, deadline: float = float("inf"),
               derandomize: bool = False) -> None:  # fmt: skip
    """`examples` generated inputs through one target (fewer if `deadline`, a monotonic time, passes)."""
    strategy, case = target

    @settings(RUN, max_examples=examples, derandomize=derandomize)
    @given(strategy)
    def one(drawn: Any) -> None:
        if time.monotonic() > deadline:
            raise OutOfTime
        case(tally, name, drawn)

    started = time.monotonic()
    with suppress(OutOfTime):
        one()
    tally.seconds[name] += time.monotonic() - started


# one round, in examples (wire and auth examples are two cases each): about a quarter of the cases are
# HTTP requests (5-15 ms each on the 2-core VM), the rest parser calls (1-3 ms each, generation included)
ROUND = {"http_openapi_positive": 400, "http_openapi_negative": 400, "http_intake_signed_evidence": 250,
         "parse_wire_bodies": 400, "parse_open_evidence": 800, "parse_open_receipt": 800,
         "parse_lease_json": 800, "parse_auth_headers": 400}  # fmt: skip


def fuzz(cases: int, max_seconds: float) -> tuple[Tally, float]:
    started = time.monotonic()
    scale = min(1.0, max(0.05, cases / 50_000))  # a small run still visits every target each round
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        os.environ["POI_HOME"] = str(Path(tmp) / "home")  # the policy file, the EAR key: never the user's
        plane, tally = Plane(Path(tmp)), Tally()
        targets = all_targets(plane)
        print(f"[{time.monotonic() - started:7.1f} s] plane seeded", flush=True)
        try:
            while sum(tally.cases.values()) < cases and time.monotonic() < started + max_seconds:
                for name, n in ROUND.items():
                    examples = max(1, int(n * scale))
                    run_target(tally, name, targets[name], examples, deadline=started + max_seconds)
                plane.audit_crashes.drain(tally)
                took, done = time.monotonic() - started, sum(tally.cases.values())
                statuses = dict(sorted(tally.statuses.items()))
                print(f"[{took:7.1f} s] {done} cases, server errors {tally.server_errors}, refusals without "
                      f"reason {tally.refusals_without_reason}, HTTP {statuses}", flush=True)  # fmt: skip
            plane.wait_for_audits()
            plane.audit_crashes.drain(tally)
            tally.ledger = plane.control.ledger_report()["check"]  # money after all that: still consistent?
        finally:
            plane.close()
    return tally, time.monotonic() - started


def write_fuzz_results(tally: Tally, seconds: float, command: str, path: Path = RESULTS) -> None:
    """This bench's keys of service.json (other benches write theirs), through bench/common/results.py."""
    values = {
        "fuzz_cases": sum(tally.cases.values()),
        "fuzz_server_errors": tally.server_errors,
        "fuzz_refusals_without_reason": tally.refusals_without_reason,
        "fuzz_by_target": dict(sorted(tally.cases.items())),
        "fuzz_seconds": round(seconds, 1),
        "fuzz_command": command,
    }
    write_results("service.json", values, writes=WRITES, path=path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="stop after this many cases")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop after this long anyway")
    parser.add_argument("--no-write", action="store_true", help="leave bench/results/service.json alone")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tally, seconds = fuzz(args.cases, args.max_seconds)
    total = sum(tally.cases.values())
    print(f"\n{total} cases in {seconds:.1f} s ({total / seconds:.0f}/s, setup included); "
          f"requests httpx could not send (not counted): {tally.unsendable}")  # fmt: skip
    for name, n in sorted(tally.cases.items()):
        print(f"  {name:30s} {n:8d} cases {n / max(tally.seconds[name], 1e-9):8.0f}/s")
    print(f"server errors: {tally.server_errors}; refusals without reason: {tally.refusals_without_reason}; "
          f"ledger after the run: {'consistent' if tally.ledger.get('ok') else tally.ledger}")  # fmt: skip
    if tally.findings:
        print("\nFINDINGS\n\n" + tally.report())
    if not args.no_write:
        command = "make bench-service-fuzz  (python -m bench.service.fuzz " + " ".join(sys.argv[1:]) + ")"
        write_fuzz_results(tally, seconds, command)
    return 1 if tally.findings or not tally.ledger.get("ok") else 0


if __name__ == "__main__":
    sys.exit(main())
