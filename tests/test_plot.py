"""`poi trace` and report.trace_plot: a PNG of one lease's evidence, drawn from the JSON files alone.

Every evidence dict here is SYNTHETIC TEST INPUT built by hand in the shape of
LeaseEvidence.as_dict(); no model runs and no figure from it is a measurement.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxwell_poi.cli import app
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.registry.profiles import Profile, Stats
from maxwell_poi.report.trace_plot import plot_demo_dir, plot_run

_stats = Stats.of


def synthetic_profile() -> Profile:
    """SYNTHETIC TEST INPUT: a made-up reference profile."""
    return Profile(
        device_class="cpu:synthetic:2cores",
        model_id="synthetic-lm",
        runs=2,
        tokens=16,
        interval_s=_stats([0.02, 0.03]),
        decode_cpu_s_per_token=_stats([0.015, 0.02]),
        decode_cores_busy=_stats([0.7, 0.8]),
        peak_rss_mb=_stats([400.0, 420.0]),
        peak_flops_per_s=1e10,
        peak_flops_per_cpu_s=1e10,
        measured_at=0.0,
        threads=[1, 2],
    )


def _trace(source: str, n: int, series: dict) -> dict:
    """SYNTHETIC TEST INPUT: a maxwell-poi-trace/v1 object."""
    return {
        "format": "maxwell-poi-trace/v1",
        "source": source,
        "trust": "simulated",
        "device": "synthetic",
        "label": "synthetic test input",
        "started_at": 1000.01,
        "duration_s": n * 0.1,
        "t": [i * 0.1 for i in range(n)],
        "series": {k: [f(i) for i in range(n)] for k, f in series.items()},
        "totals": {},
        "capabilities": [],
    }


def synthetic_evidence(*, tokens: int = 16, telemetry: bool = True, gpu: bool = False) -> dict:
    """SYNTHETIC TEST INPUT in the shape of LeaseEvidence.as_dict(): start-up for 1 s, then a token
    every 25 ms at 18 CPU-ms each."""
    stream_t = [1.0 + 0.025 * i for i in range(tokens)]
    tele = {}
    if telemetry:
        n = int((stream_t[-1] if tokens else 1.0) / 0.1) + 5
        tele["process"] = _trace(
            "process",
            n,
            {"cpu_util": lambda i: 0.7 + 0.05 * math.sin(i), "rss_mb": lambda i: min(430, 40 * i)},
        )
        tele["process"]["series"]["rss_mb"][2] = None  # a failed sample is null
    if gpu:
        tele["nvml:0"] = _trace("nvml:0", 12, {"power_w": lambda i: 80 + 20 * (i > 5)})
    return {
        "started_at": 1000.0,
        "finished_at": 1002.0,
        "wall_s": 1.6,
        "cpu_s": 1.1,
        "max_rss_kb": 440 * 1024,
        "bytes_in": 400,
        "bytes_out": 2000,
        "sha256_in": "0" * 64,
        "sha256_out": "0" * 64,
        "exit_code": 0,
        "stderr_tail": "",
        "receipt_bytes": 1000,
        "stream_tokens": list(range(tokens)),
        "stream_t": stream_t,
        "stream_cpu_s": [0.7 + 0.018 * i for i in range(tokens)],
        "stream_errors": 0,
        "device_class": "cpu:synthetic:2cores",
        "telemetry": tele,
    }


def synthetic_result(verdict: str = "contraindicated") -> dict:
    """SYNTHETIC TEST INPUT in the shape of AttestationResult.as_dict()."""
    failing = verdict == "contraindicated"
    return {
        "lease_id": "lease-synthetic",
        "agent_id": "sleeper",
        "model_id": "synthetic-lm",
        "verdict": verdict,
        "caught_by": ["L1-thermodynamic"] if failing else [],
        "reason": "synthetic",
        "cost_s": 0.01,
        "layers": [
            {
                "layer": "L1-thermodynamic",
                "status": "fail" if failing else "pass",
                "reason": "work: expected >= 6.4 CPU-ms per token, measured 0.00 " + "(synthetic) " * 20,
                "score": 0.0,
                "cost_s": 0.001,
                "details": {"rss_floor_mb": 380.0},
            },
            {
                "layer": "L4-audit",
                "status": "pass",
                "reason": "ok",
                "score": 1.0,
                "cost_s": 0.0,
                "details": {},
            },
        ],
    }


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1100, 770)  # 10 x 7 in at 110 dpi
    assert len(data) > 20_000  # axes, lines and text, not an empty canvas


@pytest.mark.parametrize(
    "case",
    [
        dict(tokens=16, telemetry=True),
        dict(tokens=16, telemetry=True, gpu=True),
        dict(tokens=0, telemetry=True),
        dict(tokens=16, telemetry=False),
        dict(tokens=0, telemetry=False),
        dict(tokens=1, telemetry=True),
    ],
    ids=["stream+telemetry", "gpu", "no-stream", "no-telemetry", "nothing", "one-token"],
)
def test_plot_run_writes_a_png(tmp_path, case):
    out = plot_run(
        LeaseEvidence.from_dict(synthetic_evidence(**case)),
        synthetic_result(),
        synthetic_profile(),
        tmp_path / "sub" / "trace.png",
        "agent sleeper / attack sleeper / synthetic-lm",
        memory_floor_mb=380.0,
    )
    assert out == tmp_path / "sub" / "trace.png"
    assert_png(out)


def test_plot_run_without_profile_or_result_and_for_embedding(tmp_path):
    assert_png(plot_run(LeaseEvidence.from_dict(synthetic_evidence()), None, None, tmp_path / "a.png"))
    embed = LeaseEvidence.from_dict(synthetic_evidence(tokens=0))
    assert_png(plot_run(embed, synthetic_result("affirming"), None, tmp_path / "b.png", job="embed"))
    assert_png(
        plot_run(
            LeaseEvidence.from_dict(synthetic_evidence()),
            synthetic_result(),
            synthetic_profile(),
            tmp_path / "c.png",
            memory_floor_mb=-50.0,
        )
    )  # a tiny model's floor can be below zero


def _run_dir(root: Path, evidence: dict) -> Path:
    d = root / "runs" / "04-sleeper"
    d.mkdir(parents=True)
    (d / "evidence.json").write_text(json.dumps(evidence))
    (d / "result.json").write_text(json.dumps(synthetic_result()))
    lease = {
        "agent_id": "sleeper",
        "model_id": "synthetic-lm",
        "precision": "fp32",
        "job": {"kind": "generate"},
    }
    (d / "lease.json").write_text(json.dumps(lease))
    return d


def test_plot_demo_dir_writes_trace_png(tmp_path):
    d = _run_dir(tmp_path, synthetic_evidence())
    assert_png(plot_demo_dir(d, None))
    assert (d / "trace.png").exists()


def test_poi_trace_command(tmp_path):
    runner = CliRunner()
    d = _run_dir(tmp_path, synthetic_evidence(telemetry=False))
    ok = runner.invoke(app, ["trace", str(d), "--out", str(tmp_path / "t.png")])
    assert ok.exit_code == 0, ok.output
    assert_png(tmp_path / "t.png")
    by_file = runner.invoke(
        app, ["trace", "--evidence", str(d / "evidence.json"), "--result", str(d / "result.json")]
    )
    assert by_file.exit_code == 0, by_file.output
    assert_png(d / "evidence.png")


def _said(result) -> str:
    return " ".join(result.output.split())  # rich wraps long error lines


def test_poi_trace_refuses_missing_and_malformed_input(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["trace", str(tmp_path / "no-such-run")])
    assert missing.exit_code == 2 and "does not exist" in _said(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_evidence = runner.invoke(app, ["trace", str(empty)])
    assert no_evidence.exit_code == 2 and "evidence.json" in _said(no_evidence)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert runner.invoke(app, ["trace", "--evidence", str(bad)]).exit_code == 2
    bad.write_text(json.dumps({"wall_s": 1.0}))
    wrong = runner.invoke(app, ["trace", "--evidence", str(bad)])
    assert wrong.exit_code == 2 and "started_at" in _said(wrong)  # the first missing field, named
    assert runner.invoke(app, ["trace"]).exit_code == 2


def test_verification_does_not_import_matplotlib():
    code = (
        "import sys, maxwell_poi.cli, maxwell_poi.demo.generation, maxwell_poi.verifier.policy;"
        "import maxwell_poi.report.trace_plot;"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
