"""What every `poi` sub-command shares: the Typer app, consoles, exit codes, error output."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Maxwell Proof of Inference: leases, agents, receipts and verdicts.", no_args_is_help=True
)
models_app = typer.Typer(help="List the model registry or add your own model.", invoke_without_command=True)
app.add_typer(models_app, name="models")
out = Console(width=None if sys.stdout.isatty() else 180)  # piped output: keep tables readable
err = Console(stderr=True)

EXIT_OK, EXIT_REJECTED, EXIT_BAD_INPUT = 0, 1, 2
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]


def _quiet() -> None:
    from ..prover.harness import quiet_libraries

    quiet_libraries()


def _bad_input(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(EXIT_BAD_INPUT)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes() if str(path) != "-" else sys.stdin.buffer.read()
    except OSError as exc:
        raise _bad_input(f"cannot read {what} {path}: {exc.strerror}") from None
