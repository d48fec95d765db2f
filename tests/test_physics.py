"""L1 and L2 decisions on hand-built evidence (synthetic inputs, labelled as such: the real
adversary programs are run through the runner in test_adversaries.py). Fast: no model runs."""

from __future__ import annotations

import hashlib
import time

import pytest

from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt, sign_receipt
from maxwell_poi.protocol.result import Status
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats
from maxwell_poi.verifier.appraisal import Appraisal
from maxwell_poi.verifier.boundary import BoundaryLayer
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer, memory_floor_mb, work_lower_bound

DEVICE = "test-device"


stats = Stats.of


@pytest.fixture()
def store(tmp_path):
    s = ProfileStore(tmp_path / "profiles.json")
    s.put(
        Profile(
            DEVICE,
            "gpt2-micro",
            4,
            16,
            interval_s=stats([0.030, 0.031, 0.029, 0.032]),
            decode_cpu_s_per_token=stats([0.050, 0.052, 0.049, 0.051]),
            decode_cores_busy=stats([1.7, 1.8, 1.6, 1.7]),
            peak_rss_mb=stats([900, 910, 905, 920]),
            peak_flops_per_s=1e11,
            peak_flops_per_cpu_s=6e10,
            measured_at=time.time(),
            threads=[1, 2],
        )
    )
    return s


def appraisal(tokens, *, stream=None, gap=0.03, cpu_per_token=0.05, rss_mb=905.0, lease=None, times=None):
    """A lease, its (synthetic) signed receipt, and synthetic runner evidence."""
    lease = lease or Lease.issue("a", "gpt2-micro", GenerateJob(prompt="hi", max_new_tokens=len(tokens)))
    from maxwell_poi.protocol.encoding import b64, sha256_hex
    from maxwell_poi.protocol.receipt import Fingerprints, ReceiptClaims, token_output

    claims = ReceiptClaims(
        lease=lease.lease_id,
        nonce=lease.nonce,
        agent="a",
        model="gpt2-micro",
        weights="0" * 64,
        precision="fp32",
        input=sha256_hex(lease.input_bytes()),
        output=token_output(tokens, 30522),
        fp=Fingerprints(k=32, chunk=32, data=b64(b"")),
        layers="0" * 64,
    )
    raw = sign_receipt(claims, AgentKey.generate())
    stream = tokens if stream is None else stream
    t = list(times) if times is not None else [1.0 + i * gap for i in range(len(stream))]
    cpu = [2.0 + i * cpu_per_token for i in range(len(stream))]
    ev = LeaseEvidence(
        started_at=0,
        finished_at=2,
        wall_s=2,
        cpu_s=3,
        max_rss_kb=int(rss_mb * 1024),
        bytes_in=10,
        bytes_out=10,
        sha256_in=hashlib.sha256(lease.to_json().encode() + b"\n").hexdigest(),
        sha256_out="",
        exit_code=0,
        stream_tokens=tuple(stream),
        stream_t=tuple(t),
        stream_cpu_s=tuple(cpu),
        device_class=DEVICE,
    )
    return Appraisal(lease=lease, raw=raw, evidence=ev, receipt=open_receipt(raw, 1 << 20))


TOKENS = list(range(1000, 1020))


def test_honest_looking_evidence_passes_both(store, registry):
    ctx = appraisal(TOKENS)
    assert ThermodynamicLayer(registry, store).appraise(ctx).status is Status.PASS
    assert BoundaryLayer(store).appraise(ctx).status is Status.PASS


def test_idle_decoding_fails_the_work_check(store, registry):
    r = ThermodynamicLayer(registry, store).appraise(appraisal(TOKENS, cpu_per_token=0.002))
    assert r.status is Status.FAIL and r.reason.startswith("work: expected >=")
    assert work_lower_bound(store.get("gpt2-micro", DEVICE)) > 0.002


def test_zero_cpu_is_below_the_physics_floor(store, registry):
    from dataclasses import replace

    slow_device = replace(store.get("gpt2-micro", DEVICE), peak_flops_per_cpu_s=1e7)  # floor: ~8 CPU-s
    store.put(slow_device)
    r = ThermodynamicLayer(registry, store).appraise(appraisal(TOKENS, cpu_per_token=0.0))
    assert r.status is Status.FAIL and r.reason.startswith("physics floor")


def test_missing_weights_fail_the_memory_check(store, registry):
    r = ThermodynamicLayer(registry, store).appraise(appraisal(TOKENS, rss_mb=300))
    assert r.status is Status.FAIL and r.reason.startswith("memory: expected the weights resident")
    ref = registry.reference("gpt2-micro")
    assert memory_floor_mb(store.get("gpt2-micro", DEVICE), ref.param_count, "fp32") > 300


def test_one_token_lease_has_no_decode_window_and_is_not_measured_not_failed(store, registry):
    one = ThermodynamicLayer(registry, store).appraise(appraisal([1000]))
    assert one.status is Status.NOT_MEASURED and "no decode window" in one.reason
    silent = ThermodynamicLayer(registry, store).appraise(appraisal(TOKENS, stream=[1000]))
    assert silent.status is Status.FAIL and "decode window" in silent.reason  # 20 leased, 1 streamed


def test_tampered_output_differs_from_the_stream(store):
    streamed = list(TOKENS)
    streamed[7] += 1
    r = BoundaryLayer(store).appraise(appraisal(TOKENS, stream=streamed))
    assert r.status is Status.FAIL and "at positions [7]" in r.reason


def test_no_stream_and_too_fast_streams_fail_l2(store, registry):
    assert "got none" in BoundaryLayer(store).appraise(appraisal(TOKENS, stream=[])).reason
    fast = BoundaryLayer(store).appraise(appraisal(TOKENS, gap=0.001))
    assert fast.status is Status.FAIL and fast.reason.startswith("timing: expected tokens >=")
    no_window = ThermodynamicLayer(registry, store).appraise(appraisal(TOKENS, stream=[]))
    assert no_window.status is Status.FAIL


def test_without_profile_or_evidence_the_layers_are_not_measured_and_say_why(tmp_path, registry):
    empty = ProfileStore(tmp_path / "none.json")
    r = ThermodynamicLayer(registry, empty).appraise(appraisal(TOKENS))
    assert r.status is Status.NOT_MEASURED and "poi profile gpt2-micro" in r.reason
    timing = BoundaryLayer(empty).appraise(appraisal(TOKENS))
    assert timing.status is Status.NOT_MEASURED and f"no profile for gpt2-micro on {DEVICE}" in timing.reason
    ctx = appraisal(TOKENS)
    ctx.evidence = None
    offline = BoundaryLayer(empty).appraise(ctx)
    assert offline.status is Status.NOT_MEASURED and "no Maxwell-side evidence" in offline.reason


def test_a_different_lease_on_the_channel_fails_l2(store):
    ctx = appraisal(TOKENS)
    other = Lease.issue("a", "gpt2-micro", GenerateJob(prompt="hi", max_new_tokens=len(TOKENS)))
    ctx.lease = other
    assert BoundaryLayer(store).appraise(ctx).reason.startswith("channel input")


def test_speculative_bursts_pass_l2_but_a_dumped_answer_does_not(store):
    # honest speculative decoding: each verification pass releases up to block + 1 tokens at once
    t, now = [], 1.0
    for i in range(len(TOKENS)):
        now += 0.0002 if i % 3 else 0.08
        t.append(now)
    ok = BoundaryLayer(store).appraise(appraisal(TOKENS, times=t))
    assert ok.status is Status.PASS, ok.reason
    assert ok.details["burst_fraction"] > 0.5 and ok.details["longest_burst"] == 2
    # paced for half the answer, then the rest at once: the mean pace holds, the burst does not
    half = [1.0 + i * 0.06 for i in range(10)] + [1.6 + i * 0.0001 for i in range(10)]
    dumped = BoundaryLayer(store).appraise(appraisal(TOKENS, times=half))
    assert dumped.status is Status.FAIL and "in a row" in dumped.reason, dumped.reason


def test_a_burst_under_contention_the_profile_never_saw_is_a_warning(store):
    """Under load the node's own reader bunches honest tokens (issue 23): the burst rule has no
    gross bound, so under unseen contention it warns instead of failing; quiet, it still fails."""
    from dataclasses import replace

    half = [1.0 + i * 0.06 for i in range(10)] + [1.6 + i * 0.0001 for i in range(10)]
    ctx = appraisal(TOKENS, times=half)
    assert ctx.evidence is not None
    ctx.evidence = replace(ctx.evidence, contention={"others_cores": 1.9, "cpu_pressure": 0.6})
    loaded = BoundaryLayer(store).appraise(ctx)
    assert loaded.status is Status.WARN, loaded.reason
    assert "in a row" in loaded.reason and "contention the profile never saw" in loaded.reason
    ctx.evidence = replace(ctx.evidence, contention={"others_cores": 0.0, "cpu_pressure": 0.0})
    quiet = BoundaryLayer(store).appraise(ctx)
    assert quiet.status is Status.FAIL and "in a row" in quiet.reason, quiet.reason


def test_tokens_that_only_arrived_bunched_warn_when_the_lease_window_holds_the_pace(tmp_path, store):
    """The node stamps a token when its reader gets to it: late under load, never early. A resident
    stream stamped as one instant (an honest 8-token decode in a busy `poi serve --local-node`) whose
    window from the lease's hand-over holds the pace is a warning; a fast one is still a failure."""
    from dataclasses import replace

    from maxwell_poi.observer.evidence import RESIDENT_REGIME, IdleGap

    resident = ProfileStore(tmp_path / "resident.json")
    resident.put(replace(store.get("gpt2-micro", DEVICE), device_class=f"{DEVICE}|{RESIDENT_REGIME}"))
    late = [0.9 + i * 0.00001 for i in range(len(TOKENS))]  # 20 tokens within 0.2 ms, 0.9 s in
    ctx = appraisal(TOKENS, times=late)
    assert ctx.evidence is not None
    ctx.evidence = replace(ctx.evidence, regime=RESIDENT_REGIME)  # the sandbox's first lease
    r = BoundaryLayer(resident).appraise(ctx)
    assert r.status is Status.FAIL and "timing" in r.reason, r.reason  # its window holds the start-up
    ctx.evidence = replace(ctx.evidence, idle_before=IdleGap(gap_s=2.0, cpu_s=0.0))  # a later lease
    r = BoundaryLayer(resident).appraise(ctx)
    assert r.status is Status.WARN, r.reason
    assert "arrived bunched" in r.reason and abs(r.details["window_interval_ms"] - 45.0) < 0.1
    # the same late dump from a sandbox that did no work in the window: a fabricator woken late
    idle = replace(ctx.evidence, cpu_s=0.0)
    ctx.evidence = idle
    r = BoundaryLayer(resident).appraise(ctx)
    assert r.status is Status.FAIL and "timing" in r.reason, r.reason
    ctx.evidence = replace(idle, cpu_s=1.0)
    fast = [0.01 + i * 0.00001 for i in range(len(TOKENS))]  # the whole answer 10 ms after the lease
    ctx.evidence = replace(ctx.evidence, stream_t=tuple(fast))
    r = BoundaryLayer(resident).appraise(ctx)
    assert r.status is Status.FAIL and "timing" in r.reason, r.reason
