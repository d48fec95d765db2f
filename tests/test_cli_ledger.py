"""`poi ledger check` / `balances`: exit 0 when the ledger adds up, 1 with each problem named,
2 with the reason when the database cannot be opened."""

from __future__ import annotations

import json
import sqlite3

from typer.testing import CliRunner

from maxwell_poi.cli import app
from maxwell_poi.ledger import Ledger, open_ledger_db


def test_check_passes_then_names_a_tampered_balance(tmp_path):
    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(open_ledger_db(db))
    ledger.deposit("alice", 5_000_000, "d1")
    ledger.escrow_stake("alice", "L1", 1_000_000)
    ledger.debit_energy("alice", "L1", 123.4, 1000)
    ok = CliRunner().invoke(app, ["ledger", "check", "--db", str(db), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    balances = json.loads(CliRunner().invoke(app, ["ledger", "balances", "--db", str(db), "--json"]).stdout)
    assert balances["balances_micro"]["wallet:alice"] == 5_000_000 - 1_000_000 - 123_400
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE accounts SET balance_micro = 1 WHERE name = 'wallet:alice'")
    bad = CliRunner().invoke(app, ["ledger", "check", "--db", str(db)])
    assert bad.exit_code == 1 and "wallet:alice" in bad.stdout and "found 1" in bad.stdout


def test_a_database_that_does_not_answer_is_bad_input_with_the_reason():
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    result = CliRunner().invoke(app, ["ledger", "check", "--db", url])
    assert result.exit_code == 2 and "cannot open the ledger" in result.stderr
    other = CliRunner().invoke(app, ["ledger", "check", "--db", "mysql://x/y"])
    assert other.exit_code == 2 and "ledger: expected" in other.stderr
