"""`poi agent --engine URL | --engine-cmd CMD`: the engine adapter as a resident (or one-shot) agent
(prover.engine, issue 27). Errors say what was tried: the URL asked, the engine's stderr tail."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from .common import _bad_input, _quiet, _read, err

ENGINE_START_TIMEOUT_S = 180.0


def engine_agent(
    key: Path,
    *,
    engine_url: str | None,
    engine_cmd: str | None,
    name: str | None,
    served_model: str | None,
    top: int,
    resident: bool,
    lease_path: Path | None,
) -> None:
    """Start the engine (with --engine-cmd) as this process's child, then answer leases through it."""
    from ..prover.engine_process import (
        EngineError,
        EngineProcess,
        engine_identity,
        private_loopback,
        ready_path,
        with_port,
    )

    if engine_url and engine_cmd:
        raise _bad_input("--engine and --engine-cmd: give one (the URL of a running engine, or its command)")
    argv: list[str] = []
    if engine_cmd:
        try:
            # first, before any thread: a confined sandbox's loopback is down (engine_process)
            done = private_loopback()
        except EngineError as exc:
            raise _bad_input(str(exc)) from None
        if done:
            print(f"engine adapter: {done}", file=sys.stderr)
        argv, port = with_port(shlex.split(engine_cmd))
        engine_url = f"http://127.0.0.1:{port}/v1"
    assert engine_url is not None
    _quiet()
    from ..protocol.errors import PoiError
    from ..protocol.keys import AgentKey
    from ..prover.engine import EngineAdapter
    from ..prover.harness import one_at_a_time, serve_one, serve_resident

    try:
        key_ = AgentKey.load(key)
    except PoiError as exc:
        raise _bad_input(str(exc)) from None
    guessed, version = engine_identity(argv) if argv else ("openai-compatible", "")
    engine = None
    if argv:
        engine = EngineProcess(argv)
    try:
        if engine is not None:
            root = engine_url.removesuffix("/v1")
            engine.wait_ready(root + ready_path(argv), ENGINE_START_TIMEOUT_S)
        adapter = EngineAdapter(key_, engine_url, name=name or guessed, version=version, top=top,
                                served_model=served_model)  # fmt: skip
        adapter.served_models()  # fails now, with the URL tried, if the engine does not answer
        if not resident:
            raise typer.Exit(serve_one(adapter.run, _read(lease_path, "lease") if lease_path else None))
        # the work probe through the engine: its log-probs after the probe's ids (protocol.probe `e`)
        raise typer.Exit(serve_resident(one_at_a_time(adapter.run), prober=adapter.probe))
    except PoiError as exc:  # EngineError included: unreachable, failed start (with its log tail)
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    finally:
        if engine is not None:
            engine.stop()
