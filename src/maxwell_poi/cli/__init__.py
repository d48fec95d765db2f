"""The `poi` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    EXIT_OK,
    EXIT_REJECTED,
    JsonOpt,
    _bad_input,
    _quiet,
    _read,
    app,
    err,
    models_app,
    out,
)


@models_app.callback()
def models(
    ctx: typer.Context,
    json_out: JsonOpt = False,
    digests: Annotated[bool, typer.Option(help="build each model and show its reference values")] = True,
) -> None:
    """List registered models with their reference values (weights digest, parameters, FLOPs/token)."""
    if ctx.invoked_subcommand:
        return
    _quiet()
    from ..protocol.errors import PoiError
    from ..registry.models import Registry

    registry = Registry()
    rows = []
    try:
        specs = registry.specs()
    except PoiError as exc:
        raise _bad_input(str(exc)) from None
    with err.status("building models to measure their reference values…"):
        for model_id, spec in specs.items():
            row = {
                "model_id": model_id,
                "kind": spec.kind,
                "family": spec.family,
                "description": spec.description,
            }
            if digests:
                row["reference"] = registry.reference(model_id).as_dict()
            rows.append(row)
    if json_out:
        print(json.dumps({"models": rows}, indent=2))
        return
    table = Table(title="Model registry")
    for col in ("model", "kind", "params", "FLOPs/token", "weights (blake3)", "description"):
        table.add_column(col)
    for r in rows:
        ref = r.get("reference", {})
        table.add_row(
            r["model_id"],
            r["kind"],
            f"{ref.get('param_count', 0) / 1e6:.1f}M" if ref else "",
            f"{ref.get('flops_per_token', 0) / 1e6:.0f}M" if ref else "",
            ref.get("weights_digest", "")[:16],
            r["description"],
        )
    out.print(table)


@models_app.command("add")
def models_add(
    model_id: str,
    path: Path,
    kind: Annotated[str, typer.Option(help="causal-lm or embedding")] = "causal-lm",
) -> None:
    """Register a local `transformers` model directory (config.json + weights) under MODEL_ID."""
    _quiet()
    from ..protocol.errors import PoiError
    from ..registry.models import Registry

    if kind not in ("causal-lm", "embedding"):
        raise _bad_input(f"--kind: expected causal-lm or embedding, got {kind!r}")
    registry = Registry()
    try:
        spec = registry.add_local(model_id, path, kind)  # type: ignore[arg-type]
        ref = registry.load(model_id).reference
    except (PoiError, OSError, ValueError) as exc:
        raise _bad_input(str(exc)) from None
    out.print(
        f"registered {spec.model_id} ({ref.param_count / 1e6:.1f}M parameters, "
        f"weights {ref.weights_digest[:16]}…) in {registry.user_file}"
    )


@app.command()
def keygen(
    out_path: Annotated[Path, typer.Option("--out", help="where to write the private key (PEM)")],
    agent_id: Annotated[str | None, typer.Option(help="enroll the public key under this agent id")] = None,
    keyring: Annotated[Path | None, typer.Option(help="keyring file to enroll into")] = None,
) -> None:
    """Create an agent's Ed25519 key; optionally enroll it in Maxwell's keyring."""
    from ..protocol.keys import AgentKey, Keyring

    if out_path.exists():
        raise _bad_input(f"{out_path} exists; refusing to overwrite a key")
    key = AgentKey.generate()
    key.save(out_path)
    if agent_id:
        path = keyring or Path("keyring.json")
        ring = Keyring.load(path)
        ring.enroll(agent_id, key.public_hex)
        ring.save(path)
        err.print(f"enrolled {agent_id} in {path}")
    print(key.public_hex)


@app.command()
def lease(
    agent_id: Annotated[str, typer.Option(help="agent the lease is issued to")],
    model: Annotated[str, typer.Option(help="model id from `poi models`")] = "gpt2-small",
    prompt: Annotated[str | None, typer.Option(help="prompt for a generation job")] = None,
    text: Annotated[list[str] | None, typer.Option(help="text for an embedding job (repeatable)")] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    precision: str = "fp32",
    ttl: Annotated[float, typer.Option(help="seconds until the deadline")] = 600.0,
    out_path: Annotated[Path | None, typer.Option("--out", help="write here instead of stdout")] = None,
) -> None:
    """Issue a lease (fresh 32-byte nonce, seeded sampler, deadline) as JSON."""
    from pydantic import ValidationError

    from ..protocol.lease import EmbedJob, GenerateJob, Lease

    if (prompt is None) == (not text):
        raise _bad_input("give either --prompt (generation) or --text (embedding)")
    try:
        job = (
            GenerateJob(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature)
            if prompt is not None
            else EmbedJob(texts=text or [])
        )
        issued = Lease.issue(agent_id, model, job, precision=precision, ttl_s=ttl)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise _bad_input(str(exc.errors()[0]["msg"])) from None
    data = issued.model_dump_json(indent=2)
    if out_path:
        out_path.write_text(data)
        err.print(f"lease {issued.lease_id} written to {out_path}")
    else:
        print(data)


@app.command()
def agent(
    key: Annotated[Path, typer.Option(help="this agent's private key (PEM)")],
    lease_path: Annotated[Path | None, typer.Option("--lease", help="lease file (default: stdin)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
    batch: Annotated[int, typer.Option(help="batch the lease with this many same-length requests")] = 1,
    resident: Annotated[
        bool, typer.Option(help="answer lease after lease on stdin (one per line) until it closes")
    ] = False,
    max_batch: Annotated[
        int, typer.Option(help="resident: decode up to this many waiting leases in one batch")
    ] = 1,
    speculative: Annotated[
        str | None,
        typer.Option(help="decode speculatively with this draft model (output identical to plain decoding)"),
    ] = None,
    block: Annotated[int, typer.Option(help="--speculative: tokens the draft proposes per pass")] = 4,
    trace_dir: Annotated[
        Path | None, typer.Option(help="keep each generation's activation trace here (receipt v3, L3)")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="answer through this OpenAI-compatible engine (URL .../v1)")
    ] = None,
    engine_cmd: Annotated[
        str | None, typer.Option(help="start this engine command as the agent's child and answer through it")
    ] = None,
    engine_name: Annotated[
        str | None, typer.Option(help="the engine's name in receipts (default: guessed)")
    ] = None,
    engine_model: Annotated[str | None, typer.Option(help="the model name the engine serves")] = None,
    engine_top: Annotated[int, typer.Option(help="top log-probs asked per position (1-20)")] = 5,
) -> None:
    """The honest reference agent: reads a lease, runs it with the prover SDK, prints the receipt
    (with --resident: stays loaded and answers leases until stdin closes, see docs/receipt.md).
    With --engine / --engine-cmd: the engine adapter (docs/receipt.md, "Engine receipts")."""
    if engine or engine_cmd:
        from .engine import engine_agent

        engine_agent(key, engine_url=engine, engine_cmd=engine_cmd, name=engine_name,
                     served_model=engine_model, top=engine_top, resident=resident,
                     lease_path=lease_path)  # fmt: skip
        return
    _quiet()
    from ..protocol.errors import PoiError
    from ..protocol.keys import AgentKey
    from ..prover.batched import BatchedProver
    from ..prover.harness import one_at_a_time, serve_one, serve_resident
    from ..prover.sdk import Prover

    if max_batch < 1:
        raise _bad_input(f"--max-batch: expected at least 1, got {max_batch}")
    if trace_dir and (speculative or max_batch > 1):
        raise _bad_input(
            "--trace-dir: traces are kept by the one-lease prover only (no --speculative, --max-batch 1)"
        )
    if speculative and (max_batch > 1 or batch > 1 or block < 1):
        raise _bad_input(
            f"--speculative: expected --block >= 1 and no batching, got --block {block}, "
            f"--max-batch {max_batch}, --batch {batch}"
        )
    try:
        key_ = AgentKey.load(key)
    except PoiError as exc:
        raise _bad_input(str(exc)) from None
    if speculative:
        from ..prover.speculative import SpeculativeProver

        spec = SpeculativeProver(key_, speculative, threads=threads, block=block)
        if resident:
            raise typer.Exit(serve_resident(one_at_a_time(spec.run), prober=spec.probe_line))
        raise typer.Exit(serve_one(spec.run, _read(lease_path, "lease") if lease_path else None))
    if resident:
        if lease_path:
            raise _bad_input("--resident reads leases from stdin; --lease is for one-shot mode")
        if max_batch > 1:
            batched = BatchedProver(key_, threads=threads)
            raise typer.Exit(serve_resident(batched.run_many, max_batch=max_batch, prober=batched.probe_line))
        one = Prover(key_, threads=threads, trace_dir=trace_dir)
        opener = one.open_line if trace_dir else None  # answers L3 challenges from the kept traces
        raise typer.Exit(serve_resident(one_at_a_time(one.run), opener=opener, prober=one.probe_line))
    prover = Prover(key_, threads=threads, batch=batch, trace_dir=trace_dir)
    raw = _read(lease_path, "lease") if lease_path else None
    raise typer.Exit(serve_one(prover.run, raw))


def _load_verifier(keyring: Path, audit_rate: float, registry=None, *, offline: bool = False):
    """`offline`: a receipt alone (no Maxwell-side evidence), so L1 and L2 are not required."""
    from ..protocol.errors import PoiError
    from ..protocol.keys import Keyring
    from ..registry.models import Registry
    from ..verifier.policy import Verifier

    if not keyring.exists():
        raise _bad_input(f"keyring {keyring} does not exist (create it with `poi keygen --agent-id`)")
    try:
        build = Verifier.offline if offline else Verifier.default
        return build(registry or Registry(), Keyring.load(keyring), audit_rate=audit_rate)
    except (PoiError, ValueError) as exc:
        raise _bad_input(str(exc)) from None


def _load_lease(path: Path):
    from ..protocol.errors import LeaseFormatError
    from ..protocol.lease import Lease

    try:
        return Lease.from_json(_read(path, "lease"))
    except LeaseFormatError as exc:
        raise _bad_input(str(exc)) from None


def _report(result, json_out: bool, extra: dict | None = None) -> None:
    from ..protocol.result import Verdict

    if json_out:
        print(json.dumps({**result.as_dict(), **(extra or {})}, indent=2))
    else:
        colour = {Verdict.AFFIRMING: "green", Verdict.WARNING: "yellow", Verdict.CONTRAINDICATED: "red"}[
            result.verdict
        ]
        out.print(
            f"[bold {colour}]{result.verdict.value}[/] lease {result.lease_id} "
            f"agent {result.agent_id} model {result.model_id}"
        )
        table = Table()
        for col in ("layer", "status", "reason", "cost"):
            table.add_column(col)
        for r in result.layers:
            table.add_row(r.layer, r.status.value, r.reason, f"{r.cost_s * 1000:.1f} ms")
        out.print(table)
    raise typer.Exit(EXIT_OK if result.verdict is Verdict.AFFIRMING else EXIT_REJECTED)


@app.command()
def verify(
    lease_path: Annotated[Path, typer.Option("--lease", help="the lease JSON Maxwell issued")],
    receipt: Annotated[Path, typer.Option(help="the agent's receipt (DSSE JSON); - for stdin")],
    keyring: Annotated[Path, typer.Option(help="Maxwell's keyring of enrolled agents")] = Path(
        "keyring.json"
    ),
    audit_rate: Annotated[float, typer.Option(help="L4 lottery probability")] = 1.0,
    evidence: Annotated[
        Path | None,
        typer.Option(
            help="the node's signed evidence for this receipt (poi node: out/<lease>/evidence.dsse.json)"
        ),
    ] = None,
    node_key: Annotated[
        Path | None, typer.Option(help="with --evidence: the node's public key, hex (poi node: node.pub)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Appraise a receipt (L0 and L4 required; L1 and L2 need Maxwell's evidence: `poi run`). L4's
    tolerance set comes from the prover's class as the node measured it: give the node's signed
    --evidence (and its --node-key) for the same rule as the node's own audit; without it, the
    cross-class set, and the result says the class was not measured. Exit 0 affirming, 1
    contraindicated or warning, 2 bad input."""
    _quiet()
    from ..protocol.errors import ReceiptFormatError
    from ..protocol.receipt import open_receipt
    from .node_evidence import EvidenceRefused, node_evidence

    the_lease = _load_lease(lease_path)
    raw = _read(receipt, "receipt")
    verifier = _load_verifier(keyring, audit_rate, offline=True)
    try:
        open_receipt(raw, max_bytes=len(raw) + 1)  # shape only; the size limit is L0's
    except ReceiptFormatError as exc:
        raise _bad_input(str(exc)) from None
    measured = None
    if (evidence is None) != (node_key is None):
        raise _bad_input("--evidence and --node-key go together (the node's key checks its signature)")
    if evidence is not None and node_key is not None:
        try:
            measured = node_evidence(_read(evidence, "evidence"), node_key, the_lease, raw)
        except EvidenceRefused as exc:
            raise _bad_input(str(exc)) from None
    _report(verifier.appraise(the_lease, raw, measured), json_out)


@app.command()
def run(
    agent_cmd: Annotated[
        str, typer.Option("--agent", help='agent command line, e.g. "poi agent --key a.pem"')
    ],
    lease_path: Annotated[Path, typer.Option("--lease", help="lease JSON to hand to the agent")],
    keyring: Annotated[Path, typer.Option(help="Maxwell's keyring of enrolled agents")] = Path(
        "keyring.json"
    ),
    receipt_out: Annotated[Path | None, typer.Option("--receipt-out", help="keep the receipt here")] = None,
    audit_rate: float = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """Run an agent as a separate process on a lease, observe the channel, and appraise."""
    _quiet()
    from ..node.runs import run_lease
    from ..protocol.errors import PoiError
    from ..registry.models import Registry

    the_lease = _load_lease(lease_path)
    registry = Registry()  # one registry for the runner and the verifier
    verifier = _load_verifier(keyring, audit_rate, registry)
    with err.status(f"agent running lease {the_lease.lease_id}…"):
        try:
            ran = run_lease(agent_cmd, the_lease, registry)
        except PoiError as exc:
            raise _bad_input(str(exc)) from None
        except OSError as exc:
            raise _bad_input(f"cannot start agent {agent_cmd!r}: {exc.strerror}") from None
    if receipt_out:
        receipt_out.write_bytes(ran.receipt)
    if ran.evidence.exit_code:
        err.print(f"[yellow]agent exited with {ran.evidence.exit_code}:[/] {ran.evidence.stderr_tail[-500:]}")
    result = verifier.appraise(the_lease, ran.receipt, ran.evidence)
    _report(result, json_out, {"evidence": ran.evidence.as_dict()})


@app.command()
def trace(
    run_dir: Annotated[
        Path | None, typer.Argument(help="a `poi demo` run folder (evidence.json, result.json, lease.json)")
    ] = None,
    evidence: Annotated[Path | None, typer.Option(help="evidence JSON (instead of RUN_DIR)")] = None,
    result: Annotated[Path | None, typer.Option(help="result JSON to go with --evidence")] = None,
    lease_path: Annotated[
        Path | None, typer.Option("--lease", help="lease JSON to go with --evidence")
    ] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="PNG to write (default RUN_DIR/trace.png)")
    ] = None,
) -> None:
    """Draw what Maxwell measured of one lease (CPU, tokens, memory) against its profile as a PNG."""
    from ..registry.models import Registry
    from ..registry.profiles import ProfileStore
    from ..report.trace_plot import plot_evidence, trace_inputs

    if (run_dir is None) == (evidence is None):
        raise _bad_input("give either RUN_DIR or --evidence FILE (with --result FILE)")
    if run_dir is not None:
        if not run_dir.is_dir():
            raise _bad_input(f"run folder {run_dir} does not exist")
        evidence = run_dir / "evidence.json"
        result = result or run_dir / "result.json"
        lease_path = lease_path or run_dir / "lease.json"
        if not evidence.exists():
            raise _bad_input(f"{run_dir} has no evidence.json: expected a `poi demo` run folder")
        if not result.exists():
            result = None
    target = out_path or (run_dir / "trace.png" if run_dir is not None else evidence.with_suffix(".png"))
    try:
        ev, res, the_lease = trace_inputs(evidence, result, lease_path)
        written = plot_evidence(ev, res, the_lease, target, ProfileStore(), registry=Registry())
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    except OSError as exc:
        raise _bad_input(f"cannot write {target}: {exc.strerror}") from None
    print(written)


if __name__ == "__main__":
    app()


from . import demo, exact, ledger, policy, service, serving, zk  # noqa: E402,F401  (register their commands on `app`)
