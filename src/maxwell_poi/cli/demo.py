"""`poi demo`: honest and cheating agents on real models, then the control plane, the gateway and
the exact tier on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import JsonOpt, _bad_input, _quiet, app, err, out

# The default tour: one cheat for each layer that catches it, on small models, so `make demo` on a
# fresh 2-core machine finishes in minutes (install included); `--full` runs the whole catalogue.
TOUR_ATTACKS = ["forged-signature", "sleeper", "output-tampering", "smaller-model", "precision-bf16"]


@app.command()
def demo(
    json_out: JsonOpt = False,
    out_dir: Annotated[Path, typer.Option("--out", help="where receipts and results go")] = Path("poi-demo"),
    model: Annotated[
        str | None, typer.Option(help="claimed model (default gpt2-mini; --full gpt2-small)")
    ] = None,
    small: Annotated[str | None, typer.Option(help="model the substitution and draft cheats run")] = None,
    alt: Annotated[str | None, typer.Option(help="same-architecture model with other weights")] = None,
    tokens: Annotated[int, typer.Option(help="new tokens per generation lease")] = 48,
    attack: Annotated[list[str] | None, typer.Option(help="run only these attack classes")] = None,
    full: Annotated[
        bool,
        typer.Option(
            help="the whole attack catalogue on gpt2-small, the trained poi-lm (also decoded "
            "speculatively) and MiniLM embeddings (~30 min on 2 cores); default: one cheat per layer"
        ),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(help="the whole catalogue on small models (gpt2-mini claimed, gpt2-micro cheats)"),
    ] = False,
    with_service: Annotated[
        bool,
        typer.Option(
            "--service/--no-service", help="then run the agents through a control plane on loopback"
        ),
    ] = True,
    with_gateway: Annotated[
        bool, typer.Option("--gateway/--no-gateway", help="end with a chat through the OpenAI gateway")
    ] = True,
    with_zk: Annotated[
        bool, typer.Option("--zk/--no-zk", help="an EZKL proof of one challenged block half (small width)")
    ] = True,
    with_exact: Annotated[
        bool,
        typer.Option("--exact/--no-exact", help="exact-tier leases through L3 (fp32, int8) and a dispute"),
    ] = True,
) -> None:
    """Issue leases to honest and cheating agents, run them, appraise, and show who got caught;
    then (--service) the same agents bid, win, pay and are slashed through Maxwell's control plane;
    then (--gateway) a verified chat completion through the OpenAI client, and a cheater cut off;
    then (--exact) exact-tier leases checked by L3 in both modes, and a dispute settled by bisection."""
    _quiet()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..adversaries import CATALOGUE
    from ..demo.exact import exact_lines, run_exact_demo, run_zk_demo, zk_lines
    from ..demo.gateway import gateway_lines, run_gateway_demo
    from ..demo.generation import Demo, DemoConfig
    from ..demo.service import ServiceDemo, ServiceDemoConfig, service_table
    from ..protocol.result import Verdict

    known = {a.name for a in CATALOGUE}
    for name in attack or []:
        if name not in known:
            raise _bad_input(f"--attack: expected one of {', '.join(sorted(known))}, got {name!r}")
    if full and quick:
        raise _bad_input("--full and --quick: expected one of them, got both")
    cfg = DemoConfig(tokens=tokens, attacks=attack, out=out_dir)
    if not full:  # the tour and --quick: small models, no second model (the tour: no embeddings either)
        cfg.model, cfg.small, cfg.alt, cfg.second_model = "gpt2-mini", "gpt2-micro", "gpt2-micro", None
        if not quick:
            cfg.embed_model = None
            cfg.attacks = attack or list(TOUR_ATTACKS)
    cfg.model, cfg.small, cfg.alt = model or cfg.model, small or cfg.small, alt or cfg.alt
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
    )
    with progress:
        task = progress.add_task("planning", total=None)

        def on_progress(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total)

        the_demo = Demo(cfg)
        rows = the_demo.run(on_progress)
        if with_service:
            scfg = ServiceDemoConfig(model=cfg.model, small=cfg.small, alt=cfg.alt, tokens=tokens)
            scfg.attacks, scfg.out = cfg.attacks, out_dir
            summary = ServiceDemo(scfg, the_demo.registry).run(on_progress)
        if with_gateway:
            progress.update(task, description="gateway: a chat through the OpenAI client", total=None)
            chat = run_gateway_demo(out_dir / "gateway")
        if with_exact:
            progress.update(task, description="exact tier: L3 challenges and a dispute", total=None)
            exact_summary = run_exact_demo(out_dir / "exact")
        if with_zk:
            progress.update(task, description="L3-zk: proving one block half with EZKL", total=None)
            zk_summary = run_zk_demo(out_dir / "zk")
    data = the_demo.report(rows)
    if with_exact:
        data["exact"] = exact_summary
    if with_zk:
        data["zk"] = zk_summary
    if with_service:
        data["service"] = summary
    if with_gateway:
        data["gateway"] = chat
    if json_out:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"poi demo — results in {out_dir}/results.json")
    for col in (
        "agent",
        "attack",
        "model",
        "verdict",
        "caught by",
        "reason",
        "sandbox",
        "agent s",
        "verify s",
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        colour = "green" if r.verdict == Verdict.AFFIRMING else "red"
        table.add_row(
            r.agent,
            r.attack or "—",
            r.model,
            f"[{colour}]{r.verdict}[/]",
            ", ".join(r.caught_by),
            (r.reason if r.attack else r.output_preview or r.reason)[:160],
            r.accounting + (f" x{r.batch}" if r.batch > 1 else ""),
            f"{r.agent_wall_s:.1f}",
            f"{r.verify_s:.2f}",
        )
    out.print(table)
    s = data["summary"]
    out.print(
        f"honest affirmed {s['honest_affirmed']}/{s['honest_runs']}; attacks contraindicated "
        f"{s['attacks_contraindicated']}/{s['attack_runs']} across {s['attack_classes']} classes; "
        "resident agents measured by "
        + ", ".join(f"{src or 'unknown'} ({n} runs)" for src, n in sorted(s["accounting_sources"].items()))
    )
    if with_service:
        out.print(service_table(summary))
        for name, why in summary["skipped"].items():
            out.print(f"[yellow]not run through the service:[/] {name}: {why}")
        ledger = summary["ledger"]
        out.print(
            f"honest agents richer than every cheater: {summary['honest_richer_than_cheaters']}; "
            f"ledger check: {'ok' if ledger['ok'] else '; '.join(ledger['problems'])}; "
            f"summary in {out_dir}/service/summary.json"
        )
    for line in gateway_lines(chat) if with_gateway else []:
        out.print(line)
    for line in exact_lines(exact_summary) if with_exact else []:
        out.print(line)
    for line in zk_lines(zk_summary) if with_zk else []:
        out.print(line)
