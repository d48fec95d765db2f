"""The `poi` command as a user runs it: separate processes, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

POI = [sys.executable, "-m", "maxwell_poi"]


def poi(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*POI, *args], cwd=cwd, input=stdin, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A keyring with one enrolled agent, a lease for it, and its honest receipt via `poi run`."""
    d = tmp_path_factory.mktemp("cli")
    assert (
        poi("keygen", "--out", "a.pem", "--agent-id", "alice", "--keyring", "ring.json", cwd=d).returncode
        == 0
    )
    made = poi(
        "lease",
        "--agent-id",
        "alice",
        "--model",
        "gpt2-micro",
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "12",
        "--out",
        "lease.json",
        cwd=d,
    )
    assert made.returncode == 0, made.stderr
    # profile first: without gpt2-micro's profile on this device L1 and L2 cannot measure (warning)
    profiled = poi("profile", "gpt2-micro", "--runs", "2", "--tokens", "16", cwd=d)
    assert profiled.returncode == 0, profiled.stderr.decode()
    ran = poi(
        "run",
        "--agent",
        f"{sys.executable} -m maxwell_poi agent --key a.pem",
        "--lease",
        "lease.json",
        "--keyring",
        "ring.json",
        "--receipt-out",
        "receipt.json",
        "--json",
        cwd=d,
    )
    assert ran.returncode == 0, ran.stderr.decode()
    return d, json.loads(ran.stdout)


def test_run_reports_verdict_and_maxwells_evidence(workspace):
    _, result = workspace
    assert result["verdict"] == "affirming"
    ev = result["evidence"]
    assert ev["bytes_out"] > 0 and ev["cpu_s"] > 0 and len(ev["sha256_out"]) == 64


def test_verify_exit_codes(workspace):
    d, _ = workspace
    ok = poi("verify", "--lease", "lease.json", "--receipt", "receipt.json", "--keyring", "ring.json", cwd=d)
    assert ok.returncode == 0, ok.stderr
    assert b"affirming" in ok.stdout
    # a lease that is not the one the receipt answers: rejected (1), with the reason
    poi(
        "lease",
        "--agent-id",
        "alice",
        "--model",
        "gpt2-micro",
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "12",
        "--out",
        "other.json",
        cwd=d,
    )
    rejected = poi(
        "verify",
        "--lease",
        "other.json",
        "--receipt",
        "receipt.json",
        "--keyring",
        "ring.json",
        "--json",
        cwd=d,
    )
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout)["caught_by"] == ["L0-integrity"]
    # bad input: clear message, exit 2
    (d / "junk.json").write_text("{not json")
    bad = poi("verify", "--lease", "lease.json", "--receipt", "junk.json", "--keyring", "ring.json", cwd=d)
    assert bad.returncode == 2 and b"expected a DSSE envelope" in bad.stderr
    missing = poi("verify", "--lease", "nope.json", "--receipt", "receipt.json", cwd=d)
    assert missing.returncode == 2 and b"cannot read lease" in missing.stderr
    bad_lease = poi(
        "verify", "--lease", "junk.json", "--receipt", "receipt.json", "--keyring", "ring.json", cwd=d
    )
    assert bad_lease.returncode == 2 and b"lease: expected" in bad_lease.stderr


def test_agent_refuses_a_bad_lease_on_stdin(workspace):
    d, _ = workspace
    res = poi("agent", "--key", "a.pem", cwd=d, stdin=b"garbage")
    assert res.returncode == 2 and b"lease: expected" in res.stderr


def test_lease_and_keygen_refuse_bad_input(workspace):
    d, _ = workspace
    assert poi("lease", "--agent-id", "alice", cwd=d).returncode == 2  # neither prompt nor text
    assert (
        poi("lease", "--agent-id", "alice", "--prompt", "x", "--max-new-tokens", "0", cwd=d).returncode == 2
    )
    again = poi("keygen", "--out", "a.pem", cwd=d)
    assert again.returncode == 2 and b"refusing to overwrite" in again.stderr


def test_demo_json_shape(tmp_path):
    res = poi(
        "demo",
        "--quick",
        "--json",
        "--attack",
        "sleeper",
        "--attack",
        "forged-signature",
        "--out",
        str(tmp_path / "demo"),
        "--no-service",  # the part through the control plane: tests/test_demo_service.py
        "--no-gateway",  # the OpenAI gateway ending: tests/test_gateway.py
        "--no-zk",  # its EZKL challenge: tests/test_zk.py runs demo_zk_challenge (30-50 s saved here)
        # its exact-tier ending (~65 s here): tests/test_exact_tier.py runs L3's float and integer
        # modes, the every-block challenge and disputes through a control plane with real agents
        "--no-exact",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    data = json.loads(res.stdout)
    assert "service" not in data and "zk" not in data and "exact" not in data
    runs = data["runs"]
    assert {r["attack"] for r in runs} == {None, "sleeper", "forged-signature"}
    for r in runs:
        assert set(r) >= {"agent", "attack", "verdict", "caught_by", "reason"}
        expected = "affirming" if r["attack"] is None else "contraindicated"
        assert r["verdict"] == expected, (r["attack"], r["reason"], res.stderr.decode()[-3000:])
    bad = poi("demo", "--attack", "no-such-attack", cwd=tmp_path)
    assert bad.returncode == 2 and b"--attack: expected one of" in bad.stderr


def test_models_lists_reference_values(tmp_path):
    res = poi("models", "--json", "--no-digests", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ids = {m["model_id"] for m in json.loads(res.stdout)["models"]}
    assert {"minilm-l6-v2", "gpt2-small", "gpt2-small-alt", "llama-small", "gpt2-mini"} <= ids


def test_enroll_agent_makes_the_commands_local_paths_absolute(tmp_path, monkeypatch):
    # nodes start agents in their own working directory: `--key alice.pem` as typed would name nothing
    from maxwell_poi.cli.service import absolute_paths

    (tmp_path / "alice.pem").write_text("key")
    monkeypatch.chdir(tmp_path)
    argv, resolved = absolute_paths(
        ["poi", "agent", "--key", "alice.pem", "--resident", "--trace-dir=alice.pem"]
    )
    key = str(tmp_path / "alice.pem")
    assert argv == ["poi", "agent", "--key", key, "--resident", f"--trace-dir={key}"]
    assert resolved == [("alice.pem", key), ("alice.pem", key)]
    assert absolute_paths(["poi", "agent", "--key", "missing.pem"]) == (
        ["poi", "agent", "--key", "missing.pem"],
        [],
    )
