"""`poi profile` and `poi node`: measuring honest serving, and serving leases on a node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import EXIT_OK, EXIT_REJECTED, JsonOpt, _bad_input, _quiet, app, err, out


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="model id to profile on this device")],
    runs: Annotated[
        int,
        typer.Option(
            help="honest runs (one-shot: alternating 1 and 2 threads; resident: per thread count, batch size)"
        ),
    ] = 4,
    tokens: Annotated[int, typer.Option(help="new tokens per run")] = 48,
    resident: Annotated[
        bool, typer.Option(help="profile a resident agent in a sandbox (what `poi node` judges by)")
    ] = False,
    batches: Annotated[str, typer.Option(help="resident: batch sizes to measure, comma-separated")] = "1,2,4",
    threads: Annotated[
        str,
        typer.Option(
            help="resident: torch thread counts to measure, comma-separated, N = this host's CPUs "
            "(L1's work floor follows the cores a lease's sandbox kept busy)"
        ),
    ] = "1,2,N",
    engine_cmd: Annotated[
        str | None,
        typer.Option(
            help="resident: profile the engine adapter serving through this engine command (`poi agent "
            "--engine-cmd`); only agents enrolled with this very engine command are judged by it"
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure what honest inference of MODEL looks like on this device (L1/L2 reference)."""
    _quiet()
    from ..node.resident_runs import measure_resident_profile
    from ..node.runs import measure_profile
    from ..node.thread_profiles import measure_threaded_profile, thread_counts
    from ..protocol.errors import PoiError
    from ..registry.profiles import ProfileStore

    if runs < 2 or tokens < 4:
        raise _bad_input(f"--runs must be >= 2 and --tokens >= 4, got {runs} and {tokens}")
    try:
        sizes = tuple(sorted({int(b) for b in batches.split(",") if b.strip()}))
        if not sizes or sizes[0] != 1:
            raise ValueError
    except ValueError:
        raise _bad_input(f"--batches: expected sizes like 1,2,4 starting at 1, got {batches!r}") from None
    try:
        counts = thread_counts(threads)
    except ValueError as exc:
        raise _bad_input(f"--threads: {exc}") from None
    if engine_cmd and not resident:
        raise _bad_input("--engine-cmd: expected with --resident (engine agents are resident), got without")
    try:
        with err.status(f"profiling {model}…") as status:
            if engine_cmd:  # the engine's own threads are in its command: no torch thread counts here
                prof = measure_resident_profile(
                    model,
                    runs=runs,
                    tokens=tokens,
                    batches=sizes,
                    on_progress=lambda m: status.update(m),
                    engine_cmd=engine_cmd,
                )
            elif resident:
                prof = measure_threaded_profile(
                    model,
                    threads=counts,
                    runs=runs,
                    tokens=tokens,
                    batches=sizes,
                    on_progress=lambda m: status.update(m),
                )
            else:
                prof = measure_profile(
                    model, runs=runs, tokens=tokens, on_progress=lambda m: status.update(m)
                )
    except (PoiError, RuntimeError, ValueError) as exc:
        raise _bad_input(str(exc)) from None
    store = ProfileStore()
    store.put(prof)
    if json_out:
        print(json.dumps(prof.as_dict(), indent=2))
        return
    out.print(f"[bold]{model}[/] on {prof.device_class} → {store.path}")
    out.print(
        f"  {prof.interval_s.median * 1000:.1f} ms/token (runs {prof.interval_s.min * 1000:.1f}–"
        f"{prof.interval_s.max * 1000:.1f}), "
        f"{prof.decode_cpu_s_per_token.mean * 1000:.1f} CPU-ms/token, "
        f"peak memory {prof.peak_rss_mb.min:.0f}–{prof.peak_rss_mb.max:.0f} MB, "
        f"peak {prof.peak_flops_per_s / 1e9:.0f} GFLOP/s"
    )
    for b, stats in prof.batch_cpu_s_per_token.items():
        out.print(
            f"  batch {b}: {stats.mean * 1000:.1f} CPU-ms per token of the batch (±{stats.std * 1000:.1f})"
        )
    for t, r in prof.threads_runs.items():
        out.print(
            f"  {t} threads: {r.cpu_s_per_token.mean * 1000:.1f} CPU-ms/token, "
            f"{r.cores_busy.min:.2f}–{r.cores_busy.max:.2f} cores busy"
        )


@app.command()
def node(
    directory: Annotated[Path, typer.Argument(help="node directory: node.json, keyring.json, leases/")],
    json_out: JsonOpt = False,
) -> None:
    """Serve a directory of leases to resident agents in measured sandboxes; sign the evidence.
    Exit 0 when every lease served was affirmed, 1 when any was not, 2 on bad input."""
    _quiet()
    from ..node import run_directory
    from ..protocol.errors import PoiError

    if not directory.is_dir():
        raise _bad_input(f"{directory}: expected a node directory (node.json, keyring.json, leases/)")
    try:
        with err.status("starting the node…") as status:
            summary = run_directory(directory, on_progress=lambda m, i, n: status.update(f"[{i}/{n}] {m}"))
    except (PoiError, ValueError, RuntimeError) as exc:
        raise _bad_input(str(exc)) from None
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"node {summary['node_id']}")
        for col in ("lease", "agent", "verdict", "caught by", "accounting", "batch", "sandbox CPU", "reason"):
            table.add_column(col)
        for r in summary["served"]:
            table.add_row(
                r["lease_id"][:8],
                r["agent_id"],
                r["verdict"],
                ",".join(r["caught_by"]),
                r["accounting"],
                str(r["batch"]),
                f"{r['sandbox_cpu_s']:.3f} s",
                r["reason"][:90],
            )
        out.print(table)
        for p in summary["refused_files"]:
            err.print(f"[yellow]refused:[/] {p}")
        out.print(
            f"{summary['affirmed']}/{len(summary['served'])} affirmed; {summary['already_done']} done before"
        )
    served = summary["served"]
    raise typer.Exit(EXIT_OK if all(r["verdict"] == "affirming" for r in served) else EXIT_REJECTED)
