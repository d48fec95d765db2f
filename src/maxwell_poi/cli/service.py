"""`poi serve` (the control plane, optionally with a node beside it) and `poi client …` (its API
from a shell: Maxwell's admin calls with the token, an agent's calls signed with its key)."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import JsonOpt, _bad_input, _quiet, app, err, out

client_app = typer.Typer(help="Call a running control plane (`poi serve`): enroll, deposit, bid, read.")
app.add_typer(client_app, name="client")
DEFAULT_SERVER = "http://127.0.0.1:8750"
ServerOpt = Annotated[str, typer.Option("--server", envvar="POI_SERVER", help="the control plane's URL")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--admin-token", envvar="POI_ADMIN_TOKEN", help="default: $POI_HOME/admin.token"),
]
KeyOpt = Annotated[Path, typer.Option("--key", help="the agent's PEM key (signs the request)")]
AgentOpt = Annotated[str, typer.Option("--agent-id", help="the agent's enrolled id")]


@app.command()
def serve(
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL or SQLite path (default $POI_HOME)")] = None,
    host: Annotated[str | None, typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 8750)")] = None,
    local_node: Annotated[bool, typer.Option(help="run one node beside the control plane")] = False,
    node_id: Annotated[str, typer.Option(help="--local-node: its id")] = "local",
    batch: Annotated[int, typer.Option(help="--local-node: leases handed to an agent at once")] = 4,
    reserve: Annotated[int | None, typer.Option(help="auction reserve price, micro-units per joule")] = None,
    audit_workers: Annotated[
        int | None, typer.Option(help="workers running queued L4 audits (default 1)")
    ] = None,
    audit_backend: Annotated[
        str | None,
        typer.Option(
            help="where audits run: thread, process (default) or ray (pip install 'maxwell-poi\\[ray]')"
        ),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="--audit-backend ray: the cluster to join (default: a local Ray)")
    ] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="POI_SERVE_ADMIN_TOKEN")] = None,
    access_log: Annotated[bool, typer.Option(help="log every request (uvicorn's access log)")] = True,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="API processes on one database (one runs the audits; the gateway needs 1)",
        ),
    ] = 1,
) -> None:
    """Maxwell's control plane: the HTTP API (OpenAPI at /docs), ledger, auction, intake, audits.
    Settings come from flags, then POI_SERVE_* variables; all are printed at start."""
    _quiet()
    import uvicorn

    from ..gateway import Gateway, mount_gateway
    from ..service import ControlPlane, ServiceConfig
    from ..service.api import create_app

    try:
        config = ServiceConfig.from_env(
            db=db,
            host=host,
            port=port,
            reserve_micro_per_j=reserve,
            audit_workers=audit_workers,
            audit_backend=audit_backend,
            ray_address=ray_address,
            admin_token=admin_token,
        )
        if workers > 1:
            if local_node:
                raise ValueError("--local-node: expected with --workers 1 (the node runs beside one process)")
            _serve_workers(config, workers, access_log)
            return
        control = ControlPlane(config)
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    except Exception as exc:  # a database that does not answer: say which and why
        raise _bad_input(f"cannot open the control plane's database: {type(exc).__name__}: {exc}") from None
    pending = control.start()
    err.print_json(json.dumps({"config": config.describe(), "audits_pending_from_before": pending}))
    unprofiled = _unprofiled(control)
    if unprofiled:
        err.print(
            f"[yellow]note:[/] no resident profile on this device for {', '.join(unprofiled)}: L1/L2 skip "
            "their leases until `poi profile MODEL --resident` has measured one"
        )
    app = create_app(control)
    mount_gateway(app, Gateway(control))  # the OpenAI-compatible routes: /v1/models, /v1/chat/completions
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=access_log))
    stop = threading.Event()
    node_thread = _local_node(control, config, node_id, batch, server, stop) if local_node else None
    try:
        server.run()
    finally:
        stop.set()
        if node_thread:
            node_thread.join(timeout=30)
        control.close()


def _serve_workers(config: Any, workers: int, access_log: bool) -> None:
    """Migrate once here, export the settings, and let uvicorn start `workers` processes that each
    build their control plane from them (cli.serve_workers)."""
    import uvicorn

    from ..service.config import ENV_PREFIX
    from ..service.store import open_store
    from .serve_workers import WORKERS_ENV

    open_store(config.url).engine.dispose()  # the schema at head before any worker starts
    config.token()  # the admin token file exists before the workers read it
    for name, value in vars(config).items():
        os.environ[ENV_PREFIX + name.upper()] = str(value)
    os.environ[WORKERS_ENV] = str(workers)
    err.print_json(json.dumps({"config": config.describe(), "api_workers": workers}))
    uvicorn.run(
        "maxwell_poi.cli.serve_workers:create_worker_app",
        factory=True,
        host=config.host,
        port=config.port,
        workers=workers,
        access_log=access_log,
    )


def _unprofiled(control: Any) -> list[str]:
    from ..observer.evidence import resident_profile_key

    device = resident_profile_key()
    return [m for m in control.registry.specs() if control.profiles.get(m, device) is None]


def _local_node(control: Any, config: Any, node_id: str, batch: int, server: Any, stop: threading.Event):
    """Enroll this host's node key (in-process, as the admin would) and start its pull loop."""
    from ..node.attest import NodeKey
    from ..node.node import Node
    from ..node.remote import RemoteNode
    from ..registry.home import poi_home
    from ..service import ServiceClient
    from ..service.wire import EnrollNode

    key = NodeKey.ensure(poi_home() / "node" / f"{node_id}.pem")
    control.enroll_node(EnrollNode(node_id=node_id, public_key=key.public_hex))
    url = f"http://{config.host}:{config.port}"

    def run() -> None:
        while not server.started and not stop.is_set():
            stop.wait(0.05)
        client = ServiceClient(url, key=key, principal=f"node:{node_id}")
        with Node(node_id, key, None) as node:
            # long-polling pulls: a gateway request reaches the node at once
            RemoteNode(client, node, batch=batch, cwd=str(poi_home()), wait_s=10.0).run(stop)

    thread = threading.Thread(target=run, name="poi-local-node", daemon=True)
    thread.start()
    err.print(f"local node {node_id!r} enrolled (key {key.public_hex[:16]}…), pulling from {url}")
    return thread


# -- poi client ---------------------------------------------------------------------------------------


def _admin(server: str, token: str | None):
    from ..registry.home import poi_home
    from ..service import ServiceClient

    if token is None:
        path = poi_home() / "admin.token"
        if not path.exists():
            raise _bad_input(f"no --admin-token and no {path}: start `poi serve` first or pass the token")
        token = path.read_text().strip()
    return ServiceClient(server, admin_token=token)


def _agent(server: str, key: Path, agent_id: str):
    from ..protocol.errors import KeyFormatError
    from ..protocol.keys import AgentKey
    from ..service import ServiceClient

    try:
        return ServiceClient(server, key=AgentKey.load(key), principal=f"agent:{agent_id}")
    except KeyFormatError as exc:
        raise _bad_input(str(exc)) from None


def _call(fn, json_out: bool) -> Any:
    import httpx

    from ..service import ServiceRefused

    try:
        answer = fn()
    except ServiceRefused as exc:
        raise _bad_input(str(exc)) from None
    except httpx.HTTPError as exc:
        raise _bad_input(f"cannot reach the control plane: {type(exc).__name__}: {exc}") from None
    body = _jsonable(answer)  # the server's JSON, read back from the client's models
    if json_out or not sys.stdout.isatty():
        print(json.dumps(body, indent=2))
    else:
        out.print_json(json.dumps(body))
    return answer


def _jsonable(answer: Any) -> Any:
    """A response model (or a list of them) as the JSON the server sent."""
    if isinstance(answer, list):
        return [_jsonable(a) for a in answer]
    dump = getattr(answer, "model_dump", None)  # a pydantic model (not imported here: CLI start-up)
    return dump(mode="json") if dump else answer


@client_app.command("enroll-agent")
def enroll_agent(
    agent_id: AgentOpt,
    key: Annotated[Path, typer.Option("--key", help="the agent's PEM key (only its public half is sent)")],
    command: Annotated[
        str, typer.Option(help="the agent program nodes run, e.g. 'poi agent --key a.pem --resident'")
    ] = "",
    server: ServerOpt = DEFAULT_SERVER,
    admin_token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Enroll an agent's public key (and the program nodes run for it). Paths in the command that
    name files here (`--key alice.pem`) are made absolute: nodes start agents in their own working
    directory, where a relative path would name nothing."""
    import shlex

    from ..protocol.keys import AgentKey

    public = AgentKey.load(key).public_hex
    argv, resolved = absolute_paths(shlex.split(command))
    for was, now in resolved:
        err.print(
            f"enroll-agent: {was} -> {now} (nodes start agents elsewhere)", markup=False, highlight=False
        )
    c = _admin(server, admin_token)
    _call(lambda: c.enroll_agent(agent_id, public, argv), json_out)


def absolute_paths(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """`argv` with every relative path that names an existing file here made absolute (also in
    `--opt=path` form), and the (was, now) pairs."""
    out, resolved = [], []
    for arg in argv:
        head, eq, tail = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        candidate = Path(tail)
        if tail and not candidate.is_absolute() and candidate.is_file():
            now = str(candidate.resolve())
            resolved.append((tail, now))
            arg = f"{head}{eq}{now}"
        out.append(arg)
    return out, resolved


@client_app.command("deposit")
def deposit(
    agent_id: AgentOpt,
    amount: Annotated[int, typer.Option(help="micro-units")],
    key: Annotated[str, typer.Option("--idempotency-key", help="the same key deposits once")],
    server: ServerOpt = DEFAULT_SERVER,
    admin_token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Put money into an agent's wallet."""
    c = _admin(server, admin_token)
    _call(lambda: c.deposit(agent_id, amount, key), json_out)


@client_app.command("ledger")
def ledger(
    server: ServerOpt = DEFAULT_SERVER, admin_token: TokenOpt = None, json_out: JsonOpt = False
) -> None:
    """Every balance, and the ledger's proof that its entries add up."""
    c = _admin(server, admin_token)
    _call(c.ledger, json_out)


@client_app.command("bid")
def bid(
    agent_id: AgentOpt,
    key: KeyOpt,
    model: Annotated[str, typer.Option(help="model id")],
    prompt: Annotated[str, typer.Option(help="the generation prompt")],
    price: Annotated[int, typer.Option(help="most you pay per measured joule, micro-units")],
    stake: Annotated[int, typer.Option(help="escrowed with the lease, slashed if it cheats")] = 0,
    tokens: Annotated[int, typer.Option(help="new tokens")] = 16,
    bid_id: Annotated[str | None, typer.Option(help="your name for the bid (default: random)")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    json_out: JsonOpt = False,
) -> None:
    """Place a sealed bid for a generation lease."""
    body = {
        "bid_id": bid_id or os.urandom(8).hex(),
        "model_id": model,
        "job": {"kind": "generate", "prompt": prompt, "max_new_tokens": tokens},
        "price_micro_per_j": price,
        "stake_micro": stake,
    }
    c = _agent(server, key, agent_id)
    _call(lambda: c.bid(body), json_out)


@client_app.command("leases")
def leases(
    agent_id: AgentOpt, key: KeyOpt, server: ServerOpt = DEFAULT_SERVER, json_out: JsonOpt = False
) -> None:
    """Your leases, with tier, audit probability and verdict."""
    c = _agent(server, key, agent_id)
    _call(c.leases, json_out)


@client_app.command("bids")
def bids(
    agent_id: AgentOpt, key: KeyOpt, server: ServerOpt = DEFAULT_SERVER, json_out: JsonOpt = False
) -> None:
    """Your bids: open, won, refused or expired, each with why (an open bid says why no round cleared
    it yet: the node's headroom, and what the lease needs)."""
    c = _agent(server, key, agent_id)
    _call(c.bids, json_out)


@client_app.command("lease")
def lease(
    agent_id: AgentOpt,
    key: KeyOpt,
    lease_id: Annotated[str, typer.Argument(help="the lease")],
    server: ServerOpt = DEFAULT_SERVER,
    json_out: JsonOpt = False,
) -> None:
    """One of your leases: its status (settled, failed, …), tier, money and verdict with its reason."""
    c = _agent(server, key, agent_id)
    view = _call(lambda: c.lease(lease_id), json_out)
    if not json_out and view.verdict is not None and view.status == "failed":
        # a failed lease (no receipt: the program never started or crashed) says why, plainly
        err.print(f"lease {lease_id} failed: {view.verdict.reason}", markup=False, highlight=False)


@client_app.command("balance")
def balance(
    agent_id: AgentOpt, key: KeyOpt, server: ServerOpt = DEFAULT_SERVER, json_out: JsonOpt = False
) -> None:
    """Your wallet and escrow."""
    c = _agent(server, key, agent_id)
    _call(c.balance, json_out)


@client_app.command("ear")
def ear(
    agent_id: AgentOpt,
    key: KeyOpt,
    lease_id: Annotated[str, typer.Argument(help="the lease")],
    server: ServerOpt = DEFAULT_SERVER,
    json_out: JsonOpt = False,
) -> None:
    """The lease's attestation result as an EAR JWT signed by Maxwell."""
    c = _agent(server, key, agent_id)
    _call(lambda: c.ear(lease_id), json_out)


@client_app.command("enroll-requester")
def enroll_requester(
    requester_id: Annotated[str, typer.Option(help="who calls the OpenAI-compatible gateway")],
    deposit: Annotated[int, typer.Option(help="opening balance, micro-units")] = 0,
    server: ServerOpt = DEFAULT_SERVER,
    admin_token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A gateway requester and its API key (printed once: use it as the openai client's api_key)."""
    c = _admin(server, admin_token)
    body = {"requester_id": requester_id, "deposit_micro": deposit}
    # the raw JSON (gateway.responses.RequesterKey): importing the gateway package would load torch
    _call(lambda: c.request("POST", "/v1/admin/requesters", body, auth="admin"), json_out)


@client_app.command("offer")
def offer(
    agent_id: AgentOpt,
    key: KeyOpt,
    model: Annotated[str, typer.Option(help="the model you serve through the gateway")],
    ask: Annotated[int, typer.Option(help="what a requester pays you per generated token, micro-units")],
    price: Annotated[int, typer.Option(help="what you pay Maxwell per measured joule, micro-units")],
    stake: Annotated[int, typer.Option(help="escrowed with each lease, slashed if it cheats")] = 0,
    server: ServerOpt = DEFAULT_SERVER,
    json_out: JsonOpt = False,
) -> None:
    """Offer to serve a model through the gateway (sealed ask; replaces your previous offer)."""
    body = {"model_id": model, "ask_micro_per_token": ask, "price_micro_per_j": price, "stake_micro": stake}
    c = _agent(server, key, agent_id)
    _call(lambda: c.request("POST", "/v1/agent/offers", body, auth="signed"), json_out)  # OfferView


@client_app.command("canary")
def canary(
    agent_id: Annotated[str, typer.Option(help="the agent to ask (it must have an offer for the model)")],
    model: Annotated[str, typer.Option(help="the model it offers")],
    server: ServerOpt = DEFAULT_SERVER,
    admin_token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Send one canary now: Maxwell's own request (a real request's job), audited; waits for its verdict."""
    c = _admin(server, admin_token)
    body = {"agent_id": agent_id, "model_id": model}
    # the raw JSON (gateway.responses.CanaryView): importing the gateway package would load torch
    _call(lambda: c.request("POST", "/v1/admin/canaries", body, auth="admin"), json_out)


@client_app.command("challenges")
def challenges(
    lease_id: Annotated[str, typer.Argument(help="an exact-tier lease")],
    server: ServerOpt = DEFAULT_SERVER,
    admin_token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The L3 openings Maxwell asked of an exact-tier lease's agent: kind, keys, deadline, answer."""
    c = _admin(server, admin_token)
    _call(lambda: c.challenges(lease_id), json_out)
