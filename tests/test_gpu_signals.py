"""GPU L1 on replayed H200 NVML traces (CI has no GPU): the committed windows of data/traces/gpu/ go
through ReplaySource into LeaseEvidence, and the thermodynamic layer judges them with the shipped
parameters (src/maxwell_poi/data/gpu_signals.json, written by bench/gpu_signals/evaluate.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.observer.telemetry.replay import ReplaySource
from maxwell_poi.observer.telemetry.trace import Measurement, TrustLevel
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import Status
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.verifier.appraisal import Appraisal
from maxwell_poi.verifier.gpu_signals import GpuSignals, card_of
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces" / "gpu"
PARAMS = {"gpt2-124m": 109_283_328, "llama-1b": 953_223_168, "llama2-7b": 6_738_415_616}


def recording(run: str, key: str, rep: int = 1) -> tuple[Measurement, dict]:
    """A committed window replayed through the live source API, and its index entry."""
    index = json.loads((TRACES / run / "index.json").read_text())
    rec = next(r for r in index["recordings"] if r["key"] == key and r["rep"] == rep)
    name = rec["files"]["nvml:0"]
    path = TRACES / run / name if (TRACES / run / name).exists() else TRACES / run / "traces" / name
    src = ReplaySource(path)
    src.begin_window()
    return src.end_window(), rec


def judge(m: Measurement, model_params: int, steps: int, batch: int = 1, precision: str = "bf16"):
    """L1's outcome for a lease claiming a model of `model_params` that streamed `steps` + 1 tokens
    (and `batch` - 1 peers streaming as many) inside this NVML window."""
    lease = Lease.issue(
        "a", "claimed", GenerateJob(prompt="hi", max_new_tokens=steps + 1), precision=precision
    )
    ev = LeaseEvidence(
        started_at=0,
        finished_at=m.duration_s,
        wall_s=m.duration_s,
        cpu_s=1.0,
        max_rss_kb=1 << 20,
        bytes_in=1,
        bytes_out=1,
        sha256_in="",
        sha256_out="",
        exit_code=0,
        stream_tokens=tuple(range(steps + 1)),
        stream_t=tuple(i * m.duration_s / (steps + 1) for i in range(steps + 1)),
        stream_cpu_s=tuple(0.001 * i for i in range(steps + 1)),
        telemetry={"nvml:0": m},
        device_class=f"cuda:{card_of(m)}",
        co_tokens=steps * (batch - 1),
        co_leases=batch - 1,
    )
    registry = SimpleNamespace(reference=lambda _id: SimpleNamespace(param_count=model_params))
    layer = ThermodynamicLayer(registry, ProfileStore(Path("/nonexistent/profiles.json")))  # type: ignore[arg-type]
    return layer.decide(Appraisal(lease=lease, raw=b"", evidence=ev))


def test_replayed_inference_windows_are_affirmed_with_size_and_energy() -> None:
    m, rec = recording("run_c_serving", "serve-llama2-7b-b1")
    assert m.trust is TrustLevel.RECORDED and card_of(m) == "NVIDIA H200"
    out = judge(m, PARAMS["llama2-7b"], rec["work"]["decode_steps"])
    assert out.status is Status.PASS, out.reason
    assert out.details["gpu_class"] == "inference" and out.details["measured_size_class"] == "7B"
    assert (
        out.details["gpu_energy"] == "pass" and out.details["j_per_token"] >= out.details["j_per_token_floor"]
    )
    # a launch-bound HF-generate window of a batch of 8 (run b), the energy floor from run c
    m, rec = recording("run_b", "infer-llama-1b-b8")
    out = judge(m, PARAMS["llama-1b"], rec["work"]["decode_steps"], batch=8)
    assert out.status is Status.PASS, out.reason
    assert out.details["measured_size_class"] == "1B"


@pytest.mark.parametrize(
    ("run", "key", "label"), [("run_b", "miner-splitmix64", "miner"), ("run_a", "burner-bf16-mm", "burner")]
)
def test_miner_and_burner_windows_are_contraindicated_with_reasons(run: str, key: str, label: str) -> None:
    m, _ = recording(run, key)
    out = judge(m, PARAMS["llama2-7b"], steps=200)
    assert out.status is Status.FAIL
    assert f"GPU workload: expected inference, NVML says {label}" in out.reason
    assert out.details["gpu_class"] == label and out.details["gpu_workload"] == "fail"


def test_idle_window_claiming_tokens_fails() -> None:
    m, _ = recording("run_a", "idle", rep=2)  # clocks up, 125 W: the harder idle
    out = judge(m, PARAMS["llama-1b"], steps=300)
    assert out.status is Status.FAIL and "NVML says idle" in out.reason


def test_a_smaller_model_under_a_7b_claim_fails_the_size_check() -> None:
    m, rec = recording("run_c_serving", "serve-llama-1b-b1")
    out = judge(m, PARAMS["llama2-7b"], rec["work"]["decode_steps"])
    assert out.status is Status.FAIL
    assert out.reason.startswith("model size: expected a 7B model") and "(1B)" in out.reason


def test_tokens_beyond_the_energy_spent_fail_the_floor() -> None:
    sig = GpuSignals.load()
    assert sig is not None
    m, rec = recording("run_c_serving", "serve-llama2-7b-b8")
    honest = sig.energy(m, rec["work"]["new_tokens"], "7B", batch=8)
    assert honest.ok is True, honest.reason
    inflated = sig.energy(m, 10 * rec["work"]["new_tokens"], "7B", batch=8)
    assert inflated.ok is False and "energy per token: expected >=" in inflated.reason
    assert sig.energy(m, rec["work"]["new_tokens"], "small", batch=8).ok is None  # no floor measured


def test_a_window_without_gpm_is_not_measured_never_passed() -> None:
    m, rec = recording("run_c_serving", "serve-llama2-7b-b1")
    stripped = replace(m, series={k: v for k, v in m.series.items() if k != "tensor_util"})
    out = judge(stripped, PARAMS["llama2-7b"], rec["work"]["decode_steps"])
    assert out.status is Status.NOT_MEASURED and "missing ['tensor_util']" in out.reason
    other_card = replace(m, device="gpu0 NVIDIA A100-SXM4-80GB")
    out = judge(other_card, PARAMS["llama2-7b"], rec["work"]["decode_steps"])
    assert out.status is Status.NOT_MEASURED and "fitted on NVIDIA H200" in out.reason


def test_gpu_strict_fp32_to_cpu_is_a_measured_pair_with_provenance() -> None:
    from maxwell_poi.verifier.audit import AuditLayer
    from maxwell_poi.verifier.thresholds import Thresholds

    thresholds = Thresholds.load()
    layer = AuditLayer(None, thresholds)  # type: ignore[arg-type]  # tolerance_pair reads no model

    def pair(device_class: str, precision: str) -> tuple[bool, str]:
        lease = Lease.issue(
            "a", "gpt2-micro", GenerateJob(prompt="hi", max_new_tokens=4), precision=precision
        )
        return layer.tolerance_pair(Appraisal(lease, b"", SimpleNamespace(device_class=device_class)))  # type: ignore[arg-type]

    same, text = pair("cuda:NVIDIA H200@strict-fp32", "fp32")  # synthetic evidence: the node's measured class
    assert (
        same is True and text.startswith("cuda:NVIDIA H200@strict-fp32 -> cpu:") and "(measured pair)" in text
    )
    assert pair("cuda:NVIDIA H200", "fp32")[0] is False  # default GPU math (TF32 allowed): not measured
    assert pair("cuda:NVIDIA H200@strict-fp32", "bf16")[0] is False  # only fp32 was measured exact
    assert pair("cuda:NVIDIA H100@strict-fp32", "fp32")[0] is False  # another card: not measured
    found = thresholds.measured_pair("cuda:NVIDIA H200@strict-fp32", layer.verifier_class(), "fp32")
    assert found is not None
    prov = found.provenance
    assert prov["source"].startswith("bench/results/gpu_core.json") and prov["card"] == "NVIDIA H200"
    assert prov["runs"] == prov["within_same_class"] > 0 and prov["worst_close_min"] == 1.0
    # the tolerance such a claim gets is the near-exact same-class one
    tol = thresholds.for_precision("fp32", same_class=True)
    assert tol.min_close > thresholds.for_precision("fp32").min_close
