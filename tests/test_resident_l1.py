"""L1 on resident evidence, with hand-built evidence and profiles (no processes): batches are
judged as a whole, the sandbox must idle between leases, and embedding leases are judged when
served alone. The real programs that produce such evidence run in test_adversaries.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from maxwell_poi.observer.evidence import IdleGap, LeaseEvidence
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.lease import EmbedJob, GenerateJob, Lease
from maxwell_poi.protocol.result import Status
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats
from maxwell_poi.verifier.appraisal import Appraisal
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer

TOKENS = 16
PER_TOKEN = {
    "1": 0.010,
    "2": 0.0085,
    "4": 0.004,
}  # honest CPU-s per token of the batch (as measured here: a batch of 2 costs 1.7x a lone step)


@pytest.fixture()
def layer(tmp_path, registry):
    store = ProfileStore(tmp_path / "profiles.json")
    common = dict(
        device_class=f"{this_device()}|resident",
        tokens=TOKENS,
        peak=dict(peak_flops_per_s=1e11, peak_flops_per_cpu_s=1e11),
        measured_at=0.0,
        regime="resident",
        busy=[1.0, 1.0],
        memory=[300.0, 310.0],
    )
    store.put(
        Profile.from_runs(
            model_id="gpt2-micro",
            intervals=[0.02, 0.021],
            cpu_per_token=[0.0099, 0.0101],
            batch_cpu_s_per_token={b: Stats.of([v * 0.99, v * 1.01]) for b, v in PER_TOKEN.items()},
            **common,
        )
    )
    store.put(
        Profile.from_runs(
            model_id="minilm-l6-v2",
            intervals=[0.05, 0.05],
            cpu_per_token=[0.01, 0.0105],
            # large enough that a fabricated lease lies below the floor by more than the two
            # accounting ticks of slack a short window is given
            embed_cpu_s_per_token=Stats.of([0.01, 0.0105]),
            **common,
        )
    )
    return ThermodynamicLayer(registry, store)


def evidence(per_token_s: float, co_leases: int = 0, gap_s: float = 0.02, **kw) -> LeaseEvidence:
    """A resident lease that streamed TOKENS tokens `gap_s` apart, each batch peer as many in the
    same window."""
    n = TOKENS * (1 + co_leases)
    t = [gap_s * i for i in range(TOKENS)]
    cpu = [per_token_s * n * i / (TOKENS - 1) for i in range(TOKENS)]
    return LeaseEvidence(
        started_at=0.0,
        finished_at=1.0,
        wall_s=1.0,
        cpu_s=cpu[-1],
        max_rss_kb=310 * 1024,
        bytes_in=1,
        bytes_out=1,
        sha256_in="",
        sha256_out="",
        exit_code=None,
        stream_tokens=tuple(range(TOKENS)),
        stream_t=tuple(t),
        stream_cpu_s=tuple(cpu),
        device_class=this_device(),
        regime="resident",
        accounting={"source": "cgroup-v1", "trust": "kernel-cgroup", "resolution_s": 0.004},
        co_tokens=(TOKENS - 1) * co_leases,
        co_leases=co_leases,
        **kw,
    )


def judge(layer, lease: Lease, ev: LeaseEvidence):
    return layer.appraise(Appraisal(lease=lease, raw=b"", evidence=ev))


def gen_lease() -> Lease:
    return Lease.issue("a", "gpt2-micro", GenerateJob(prompt="x", max_new_tokens=TOKENS))


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_an_honest_batch_passes_at_its_batch_size(layer, batch):
    r = judge(layer, gen_lease(), evidence(PER_TOKEN[str(batch)], co_leases=batch - 1))
    assert r.status is Status.PASS, r.reason
    assert r.details["batch"] == batch


def test_a_batch_of_two_that_did_a_tenth_of_the_work_fails_the_work_check(layer):
    # two leases streamed, a tenth of a lone lease's work done: the window's CPU spread over 2 x tokens
    r = judge(layer, gen_lease(), evidence(PER_TOKEN["1"] / 20, co_leases=1))
    assert r.status is Status.FAIL and "batch of 2" in r.reason


def test_a_batch_of_two_that_computed_one_is_not_what_l1_can_tell(layer):
    # The limit, stated as a test so that a change to it is seen: the floor is 0.35 of the smallest
    # honest run because CPU per token drifts ~2.5x on a shared host (verifier.thermodynamic), so a
    # batch of two answered with one computation (half the work) passes L1. The batch copier is
    # left to the audits and to the scheduler's pricing of identical prompts (issue 23).
    r = judge(layer, gen_lease(), evidence(PER_TOKEN["1"] / 2, co_leases=1))
    assert r.status is Status.PASS, r.reason


def test_a_sandbox_off_the_cpu_while_it_decoded_fails_unless_it_was_waiting_for_one(layer):
    # the work per token is there, but spread over ten times the wall time with the sandbox idle
    # (sleeping between tokens, or a hop to a worker elsewhere): decoding is compute-bound
    slept = judge(layer, gen_lease(), evidence(0.010, gap_s=0.2, contention={"wait_s": 0.0}))
    assert slept.status is Status.FAIL and "on a CPU while decoding" in slept.reason, slept.reason
    # the same wall time spent waiting in the run queue (a busy host) is not the agent's
    waited = judge(layer, gen_lease(), evidence(0.010, gap_s=0.2, contention={"wait_s": 2.9}))
    assert waited.status is Status.PASS, waited.reason
    assert waited.details["cores_on_free_cpu"] > 0.3
    # without a measured delay (one-shot agents) the check says nothing
    unmeasured = judge(layer, gen_lease(), evidence(0.010, gap_s=0.2))
    assert unmeasured.status is Status.PASS and "cores_on_free_cpu" not in unmeasured.details


QUIET = {"others_cores": 0.05, "cpu_pressure": 0.01}
LOADED = {"others_cores": 1.9, "cpu_pressure": 0.6}  # a neighbour on both cores: unseen by the profile


def test_a_moderate_work_miss_under_unseen_contention_is_a_warning_not_a_failure(layer):
    bound = 0.35 * 0.0099  # WORK_MIN_FRACTION of the smallest honest run
    r = judge(layer, gen_lease(), evidence(0.7 * bound, contention=LOADED))
    assert r.status is Status.WARN, r.reason
    assert "contention the profile never saw" in r.reason and "others_cores 1.90" in r.reason
    assert r.details["contention_others_cores"] == 1.9


def test_the_same_miss_on_a_host_like_the_profiles_is_a_failure(layer):
    bound = 0.35 * 0.0099
    r = judge(layer, gen_lease(), evidence(0.7 * bound, contention=QUIET))
    assert r.status is Status.FAIL and r.reason.startswith("work:"), r.reason


def test_a_gross_work_miss_fails_under_any_contention(layer):
    # a sleeper or a relay does almost nothing: waiting for a CPU never shrinks the work a token needs
    bound = 0.35 * 0.0099
    r = judge(layer, gen_lease(), evidence(0.3 * bound, contention=LOADED))
    assert r.status is Status.FAIL and "never saw" not in r.reason, r.reason


class SaysMiner:
    """A stand-in for the trained trace classifier (unit test only): it calls every trace a miner."""

    def predict(self, features: dict[str, float]) -> tuple[str, float, dict[str, float]]:
        return "miner", 0.9, {"p_inference": 0.05}


def test_a_trace_shape_rejection_under_unseen_contention_is_a_warning(layer):
    # the classifier's features (pace, cores busy, bursts) move with the host's load: on a loaded host
    # an honest trace it calls a miner is not judged (WARN: unpaid, the stake held), on a quiet one it fails
    classified = ThermodynamicLayer(layer.registry, layer.profiles, classifier=SaysMiner())
    loaded = judge(classified, gen_lease(), evidence(PER_TOKEN["1"], contention=LOADED))
    assert loaded.status is Status.WARN, loaded.reason
    assert "trace classifier says miner" in loaded.reason and "never saw" in loaded.reason
    quiet = judge(classified, gen_lease(), evidence(PER_TOKEN["1"], contention=QUIET))
    assert quiet.status is Status.FAIL and "trace classifier says miner" in quiet.reason, quiet.reason


def test_a_batch_without_a_batched_profile_is_not_measured_not_passed(layer, tmp_path, registry):
    bare = ProfileStore(tmp_path / "bare.json")
    p = layer.profiles.get("gpt2-micro", f"{this_device()}|resident")
    bare.put(Profile(**{**p.as_dict(), "batch_cpu_s_per_token": {}}))
    r = judge(ThermodynamicLayer(registry, bare), gen_lease(), evidence(0.006, co_leases=1))
    assert r.status is Status.NOT_MEASURED and "no batch sizes" in r.reason


def test_work_between_leases_fails_and_an_idle_gap_passes(layer):
    busy = judge(layer, gen_lease(), evidence(0.010, idle_before=IdleGap(gap_s=1.0, cpu_s=0.9)))
    assert busy.status is Status.FAIL and "between leases" in busy.reason
    idle = judge(layer, gen_lease(), evidence(0.010, idle_before=IdleGap(gap_s=1.0, cpu_s=0.02)))
    assert idle.status is Status.PASS, idle.reason


def embed_lease() -> Lease:
    return Lease.issue("a", "minilm-l6-v2", EmbedJob(texts=["Maxwell verifies inference."]))


def embed_evidence(cpu_s: float, regime: str = "resident", overlapped: int = 0) -> LeaseEvidence:
    ev = evidence(0.01)
    fields = {**ev.__dict__, "stream_tokens": (), "stream_t": (), "stream_cpu_s": (), "co_tokens": 0}
    return LeaseEvidence(**{**fields, "cpu_s": cpu_s, "regime": regime, "overlapped": overlapped})


def test_embedding_leases_are_judged_when_resident_and_alone(layer, registry):
    tokens = len(registry.encode_prompt("minilm-l6-v2", "Maxwell verifies inference.")) + 1
    honest = judge(layer, embed_lease(), embed_evidence(0.01 * tokens))
    assert honest.status is Status.PASS, honest.reason
    fabricated = judge(layer, embed_lease(), embed_evidence(0.0005 * tokens))
    assert fabricated.status is Status.FAIL and "input tokens" in fabricated.reason
    overlapped = judge(layer, embed_lease(), embed_evidence(0.0001 * tokens, overlapped=2))
    assert overlapped.status is Status.NOT_MEASURED and "alongside 2 other leases" in overlapped.reason


def bunched(lease_cpu_s: float) -> LeaseEvidence:
    """Simulated evidence (a unit test): an honest pace from the lease's hand-over, but the node read
    every token within 0.2 ms (its reader was late), so the decode window holds no CPU; the lease's
    own CPU is `lease_cpu_s`. Not the sandbox's first lease (an idle gap before it)."""
    t = tuple(0.3 + 0.0002 * i / (TOKENS - 1) for i in range(TOKENS))
    return replace(
        evidence(PER_TOKEN["1"]),
        stream_t=t,
        stream_cpu_s=tuple(lease_cpu_s for _ in t),
        cpu_s=lease_cpu_s,
        idle_before=IdleGap(gap_s=1.0, cpu_s=0.0),
    )


def test_tokens_that_arrived_bunched_are_judged_over_the_lease_window(layer):
    # honest: the lease's CPU holds the work; before, the 0.2 ms window's ~0 CPU failed L1
    honest = judge(layer, gen_lease(), bunched(PER_TOKEN["1"] * TOKENS * 1.1))
    assert honest.status is Status.PASS, honest.reason
    assert honest.details["window"] == "lease (the tokens arrived bunched)"
    # a sleeper that dumps its tokens at once: no work in the lease either, still caught
    sleeper = judge(layer, gen_lease(), bunched(0.001))
    assert sleeper.status is Status.FAIL and "work" in sleeper.reason, sleeper.reason


def test_a_sandboxs_first_lease_is_not_given_the_lease_window(layer):
    # its window would hold the agent's start-up (imports, model load): L2's bunched rule says the same
    ev = replace(bunched(PER_TOKEN["1"] * TOKENS * 1.1), idle_before=None)
    r = judge(layer, gen_lease(), ev)
    assert r.status is Status.FAIL and "window" not in r.details, r.reason
