"""`poi ledger`: read Maxwell's double-entry ledger and prove that it adds up."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import EXIT_OK, EXIT_REJECTED, JsonOpt, _bad_input, app, out

ledger_app = typer.Typer(help="Maxwell's ledger: balances, and a check that every entry adds up.")
app.add_typer(ledger_app, name="ledger")
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="SQLAlchemy URL or SQLite path (default $POI_HOME/ledger.sqlite)"),
]


def _engine(db: str | None):
    from ..ledger import LedgerError, open_ledger_db

    try:
        return open_ledger_db(db)
    except LedgerError as exc:
        raise _bad_input(str(exc)) from None
    except Exception as exc:  # a database that does not answer: say which and why, not a traceback
        raise _bad_input(
            f"cannot open the ledger at {db or 'the default path'}: {type(exc).__name__}: {exc}"
        ) from None


@ledger_app.command("check")
def check(db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Prove the ledger adds up: every transfer sums to zero, every cached balance equals the sum of
    its entries, no wallet below zero. Exit 0 when it does, 1 with each problem listed."""
    from ..ledger import check_ledger

    report = check_ledger(_engine(db))
    if json_out:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        state = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
        counts = f"{report.accounts} accounts, {report.transfers} transfers, {report.entries} entries"
        out.print(f"ledger {state}: {counts}")
        for p in report.problems:
            out.print(f"  - {p}")
    raise typer.Exit(EXIT_OK if report.ok else EXIT_REJECTED)


@ledger_app.command("balances")
def balances(db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Every account's balance (micro-units; 1,000,000 = one unit)."""
    from ..ledger import Ledger

    found = Ledger(_engine(db)).balances()
    if json_out:
        print(json.dumps({"balances_micro": found}, indent=2))
        return
    table = Table(title="ledger balances")
    table.add_column("account")
    table.add_column("balance", justify="right")
    for name, micro in sorted(found.items()):
        table.add_row(name, f"{micro / 1e6:,.6f}")
    out.print(table)
