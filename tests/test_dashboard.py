"""The control plane's dashboard: its admin JSON route, and its page in a REAL headless Chromium.

Everything runs over real HTTP (uvicorn on loopback) through the real code paths: enrollment, a
deposit, signed bids, a node's pulls, and a REAL honest resident agent (gpt2-micro) run by a Node,
whose receipt and node-signed evidence go to /v1/node/intake. A second lease is answered by
REPLAYING: the node hands in the first lease's real receipt, with the first lease's real
measurements re-signed by the node for the second lease (as a node would for an agent that
replays). Its verdict comes from the real verifier. No row is written by hand.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session

from maxwell_poi.ledger import Ledger, open_ledger_db
from maxwell_poi.node.attest import NodeKey, open_evidence, sign_evidence
from maxwell_poi.node.node import Node
from maxwell_poi.node.remote import RemoteNode
from maxwell_poi.node.resident_runs import measure_resident_profile
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig
from maxwell_poi.service.api import create_app
from maxwell_poi.service.dashboard import snapshot
from maxwell_poi.service.schema import ReceiptRow
from maxwell_poi.service.wire import BidBody, Deposit, EnrollAgent, EnrollNode, PullBody

TOKEN = "dashboard-admin-token"
TOKENS = 16
ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts"
NO_CHROMIUM = "no chromium on PATH: install Debian's chromium: apt-get install -y chromium"


@dataclass
class Served:
    url: str
    cp: ControlPlane
    answers: dict[str, dict[str, Any]]  # lease id -> the intake answer
    honest: str  # the lease the real agent answered
    replayed: str  # the lease answered with the honest lease's receipt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp / "home"))
        mp.setenv("OMP_NUM_THREADS", "1")  # one torch thread in the agent: a shared host stays usable
        # profile first: L1 and L2 are required, and without a profile they end the honest lease at warning
        ProfileStore().put(measure_resident_profile("gpt2-micro", runs=3, tokens=TOKENS, batches=(1,)))
        config = ServiceConfig.from_env(db=str(tmp / "cp.sqlite"), admin_token=TOKEN, reserve_micro_per_j=20)
        cp = ControlPlane(config)
        cp.start()
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(cp), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        try:
            yield _serve_two_leases(cp, url, tmp)
        finally:
            server.should_exit = True
            thread.join(30)
            cp.close()


def _serve_two_leases(cp: ControlPlane, url: str, tmp: Path) -> Served:
    node_key, alice = NodeKey.generate(), AgentKey.generate()
    alice.save(tmp / "alice.pem")
    argv = [sys.executable, "-m", "maxwell_poi", "agent", "--resident", "--key", str(tmp / "alice.pem")]
    admin = ServiceClient(url, admin_token=TOKEN)
    admin.enroll_node("n1", node_key.public_hex)
    admin.enroll_agent("alice", alice.public_hex, argv)
    admin.deposit("alice", 10_000_000, "d1")
    agent = ServiceClient(url, key=alice, principal="agent:alice")
    node_client = ServiceClient(url, key=node_key, principal="node:n1")

    def bid(bid_id: str) -> None:
        job = {"kind": "generate", "prompt": "the dashboard", "max_new_tokens": TOKENS}
        agent.bid({"bid_id": bid_id, "model_id": "gpt2-micro", "job": job, "price_micro_per_j": 100,
                   "stake_micro": 100_000})  # fmt: skip

    bid("honest")
    with Node("n1", node_key, None) as node:
        (honest,) = RemoteNode(node_client, node, batch=1, headroom=lambda: 1e6).step()
    assert cp.audits.drain(120)  # a drawn audit (possible at this tier) finalises the stake
    bid("replayed")
    (pulled,) = node_client.pull(1e6, ["alice"], max_leases=1).leases
    replayed_id = pulled.lease["lease_id"]
    with Session(cp.ledger.engine) as session:
        kept = session.get(ReceiptRow, honest.lease_id)
    measured = open_evidence(kept.evidence, cp.nodes)
    evidence = sign_evidence(
        measured.evidence, replayed_id, kept.receipt, node_id="n1", sandbox=measured.sandbox, key=node_key
    )
    replayed = node_client.intake(replayed_id, kept.receipt, evidence)
    answers = {a.lease_id: a.model_dump(mode="json") for a in (honest, replayed)}  # the intake JSON
    return Served(url, cp, answers, honest.lease_id, replayed_id)


def _dashboard(served: Served, token: str | None = TOKEN, query: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(f"{served.url}/v1/admin/dashboard{query}", headers=headers, timeout=30)


# -- the JSON route -------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}"])
def test_the_route_refuses_a_missing_or_wrong_token(served: Served, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    r = httpx.get(f"{served.url}/v1/admin/dashboard", headers=headers, timeout=30)
    assert r.status_code == 401, r.text  # the admin check answers 401 to both (service.auth)
    error = r.json()["error"]
    assert error["status"] == 401 and "Bearer" in error["expected"]
    assert TOKEN not in r.text


def test_the_route_shows_the_leases_with_their_verdicts(served: Served) -> None:
    r = _dashboard(served)
    assert r.status_code == 200, r.text
    data = r.json()
    leases = {lease["lease_id"]: lease for lease in data["leases"]}
    assert [lease["lease_id"] for lease in data["leases"]] == [served.replayed, served.honest]  # newest first
    for lease_id, answer in served.answers.items():
        shown = leases[lease_id]
        assert (shown["verdict"], shown["charge_micro"], shown["stake_outcome"]) == (
            answer["verdict"],
            answer["charge_micro"],
            answer["stake_outcome"],
        )
        assert shown["reason"] and shown["reason"] == answer["reason"]
        assert (shown["agent"], shown["node"], shown["model"]) == ("alice", "n1", "gpt2-micro")
        assert {layer["layer"] for layer in shown["layers"]} >= {"L0-integrity"}
    assert served.answers[served.honest]["verdict"] == "affirming"  # a real honest agent
    assert served.answers[served.replayed]["verdict"] == "contraindicated"  # a replayed receipt
    (alice,) = data["agents"]
    assert alice["leases"] == {"affirming": 1, "contraindicated": 1}
    balances = served.cp.ledger.balances()
    assert (alice["wallet_micro"], alice["escrow_micro"]) == (
        balances["wallet:alice"],
        balances["escrow:alice"],
    )
    assert [n["node_id"] for n in data["nodes"]] == ["n1"] and data["nodes"][0]["last_seen"] is not None


def test_balances_over_time_follow_the_ledger(served: Served) -> None:
    series = {s["account"]: s["points"] for s in _dashboard(served).json()["balances"]}
    balances = served.cp.ledger.balances()
    for account in ("wallet:alice", "escrow:alice", "maxwell:energy", "maxwell:slashed"):
        points = series[account]
        assert points[-1][1] == balances[account], account  # ends at the balance now
        assert [t for t, _ in points] == sorted(t for t, _ in points), account
        entries = served.cp.ledger.entries_for(account)
        assert len(points) == len(entries) + 2, account  # the start, one per entry, now
        assert points[0][1] == 0, account  # the whole history fits the window: it starts empty
    assert max(b for _, b in series["wallet:alice"]) == 10_000_000  # the deposit, before any lease
    assert balances["maxwell:slashed"] == 100_000  # the replay's stake


def test_traces_come_from_the_node_signed_evidence(served: Served) -> None:
    traces = {t["lease_id"]: t for t in _dashboard(served).json()["traces"]}
    assert set(traces) == {served.honest, served.replayed}
    with Session(served.cp.ledger.engine) as session:
        kept = session.get(ReceiptRow, served.honest)
    measured = open_evidence(kept.evidence, served.cp.nodes).evidence
    trace = traces[served.honest]
    assert trace["error"] is None and trace["tokens"] == len(measured.stream_t) == TOKENS
    assert trace["stream_t"] == list(measured.stream_t)
    assert trace["stream_cpu_s"] == list(measured.stream_cpu_s)
    assert trace["stream_t"] == sorted(trace["stream_t"])


def test_the_lease_limit_is_bounded(served: Served) -> None:
    newest = _dashboard(served, query="?limit=1").json()["leases"]
    assert [lease["lease_id"] for lease in newest] == [served.replayed]
    for bad in ("0", "501", "many"):
        r = _dashboard(served, query=f"?limit={bad}")
        assert r.status_code == 422 and r.json()["error"]["status"] == 422, r.text


def test_the_page_and_its_files(served: Served) -> None:
    page = httpx.get(f"{served.url}/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="leases-table"' in page.text and "dashboard/static/dashboard.js" in page.text
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = httpx.get(f"{served.url}/dashboard/static/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    r = httpx.get(f"{served.url}/dashboard/static/dashboard.html.bak", timeout=30)
    assert r.status_code == 404 and "dashboard.js" in r.json()["error"]["expected"]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_issued_lease_without_a_receipt_on_both_databases(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    """The snapshot's queries (PostgreSQL: one repeatable-read snapshot) on a lease pulled but not
    answered: no verdict, its agent's money in escrow, no trace."""
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    ledger = None
    if database == "postgresql":
        url, args = request.getfixturevalue("pg_schema")
        ledger = Ledger(open_ledger_db(url, connect_args=args))
    config = ServiceConfig.from_env(db=str(tmp_path / "cp.sqlite"), admin_token=TOKEN, reserve_micro_per_j=20)
    cp = ControlPlane(config, ledger=ledger)
    try:
        cp.enroll_agent(EnrollAgent(agent_id="bob", public_key=AgentKey.generate().public_hex))
        cp.enroll_node(EnrollNode(node_id="n2", public_key=NodeKey.generate().public_hex))
        cp.deposit(Deposit(agent_id="bob", amount_micro=1_000_000, key="d"))
        job = {"kind": "generate", "prompt": "hi", "max_new_tokens": 4}
        bid = {
            "bid_id": "b",
            "model_id": "gpt2-micro",
            "job": job,
            "price_micro_per_j": 100,
            "stake_micro": 5000,
        }
        cp.market.place_bid("bob", BidBody.model_validate(bid))
        (pulled,) = cp.market.pull("n2", PullBody(headroom_j=1e6, agents=["bob"], max_leases=1))
        data = snapshot(cp)
    finally:
        cp.close()
    (lease,) = data["leases"]
    assert (lease["lease_id"], lease["verdict"], lease["status"]) == (pulled.lease.lease_id, None, "pulled")
    (bob,) = data["agents"]
    assert bob["leases"] == {"open": 1} and bob["escrow_micro"] > 5000  # the stake and the energy hold
    escrow = {s["account"]: s["points"] for s in data["balances"]}["escrow:bob"]
    assert [b for _, b in escrow] == [0, escrow[1][1], bob["escrow_micro"], bob["escrow_micro"]]
    assert data["traces"] == []


# -- the page in a real browser -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    return found


def _browse(chromium: str, url: str, profile: Path, *extra: str) -> str:
    """Chromium headless on `url`, 8 s of virtual time (the page's first load and one refresh)."""
    argv = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
            f"--user-data-dir={profile}", *extra, url]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements below this one with this tag and these attribute values ("class" matches one class)."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if (tag is None or child.tag == tag) and all(_has(child, k, v) for k, v in attrs.items()):
                found.append(child)
            found.extend(child.find(tag, **attrs))
        return found


def _has(element: Element, name: str, value: str) -> bool:
    name = name.rstrip("_").replace("_", "-")  # class_ -> class, data_lease -> data-lease
    got = element.attrs.get(name)
    return got is not None and (value in got.split() if name == "class" else got == value)


class DomParser(HTMLParser):
    """The dumped DOM as a tree of Elements (Chromium closes every element it serialises)."""

    VOID = {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _dom(html: str) -> Element:
    parser = DomParser()
    parser.feed(html)
    return parser.root


def test_the_page_in_chromium_shows_leases_verdicts_and_plots(
    chromium: str, served: Served, tmp_path: Path
) -> None:
    html = _browse(chromium, f"{served.url}/dashboard#token={TOKEN}", tmp_path / "profile", "--dump-dom")
    dom = _dom(html)
    (body,) = dom.find("body")
    assert body.attrs["data-state"] == "ok", html[-3000:]
    assert TOKEN not in html  # read from the fragment, kept in sessionStorage, not in the page
    (message,) = dom.find(id="auth-message")
    assert "hidden" in message.attrs
    for lease_id, answer in served.answers.items():
        (row,) = dom.find("tr", data_lease=lease_id)
        (verdict,) = row.find("td", class_="verdict")
        assert verdict.attrs["data-verdict"] == answer["verdict"]
        assert verdict.text().strip().startswith(answer["verdict"])
        (pill,) = verdict.find("span", class_="pill")
        assert f"v-{answer['verdict']}" in pill.attrs["class"]  # coloured by verdict
        (reason,) = row.find("td", class_="reason")
        assert reason.text() == answer["reason"]
    (alice,) = dom.find("tr", data_agent="alice")
    assert {c.attrs["data-count"]: c.text() for c in alice.find("td") if "data-count" in c.attrs} == {
        "affirming": "1", "warning": "0", "contraindicated": "1", "open": "0",
    }  # fmt: skip
    assert dom.find("tr", data_node="n1")
    (balances,) = dom.find(id="balances-plot")
    drawn = {p.attrs["data-series"]: p.attrs["d"] for p in balances.find("path", class_="series")}
    assert {"wallet:alice", "escrow:alice", "maxwell:slashed"} <= set(drawn)
    assert all(d.count("H") >= 2 for d in drawn.values())  # stepped lines through several entries
    assert balances.find("text", class_="axis-title")
    (honest,) = dom.find("div", data_trace=served.honest)
    for plot in ("trace-tokens", "trace-cpu"):
        (svg,) = honest.find("svg", class_=plot)
        (line,) = svg.find("path", class_="series")
        assert line.attrs["d"].count("L") == TOKENS - 1  # one segment per token after the first
        assert len(svg.find("circle")) == TOKENS


def test_a_screenshot_of_the_page(chromium: str, served: Served, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    url = f"{served.url}/dashboard#token={TOKEN}"
    _browse(chromium, url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1100")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000, shot.stat().st_size


@pytest.mark.parametrize(
    ("fragment", "state", "says"),
    [("", "no-token", "#token="), ("#token=wrong", "refused", "no or a wrong token")],
)
def test_the_page_says_what_it_expects_without_the_right_token(
    chromium: str, served: Served, tmp_path: Path, fragment: str, state: str, says: str
) -> None:
    html = _browse(chromium, f"{served.url}/dashboard{fragment}", tmp_path / "profile", "--dump-dom")
    dom = _dom(html)
    (body,) = dom.find("body")
    assert body.attrs["data-state"] == state
    (message,) = dom.find(id="auth-message")
    assert "hidden" not in message.attrs and says in message.text()
    (content,) = dom.find(id="content")
    assert "hidden" in content.attrs and not dom.find("tr", data_lease=served.honest)  # nothing shown
