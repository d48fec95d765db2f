"""L1's work floor follows the cores the sandbox kept busy (issue 24), with hand-built profiles and
evidence (no processes; tests/test_thread_floors_live.py runs real agents at 1, 2 and N threads).

The numbers are this host's shape: a 2-thread agent burns about twice the CPU per token of a
1-thread one at the same pace (spin-waits), and a profile measured beside a neighbour records its
2-thread runs at four times the 1-thread work, with fewer cores busy."""

from __future__ import annotations

import dataclasses

import pytest

from maxwell_poi.node.thread_profiles import thread_counts
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import Status
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats, ThreadRuns
from maxwell_poi.verifier.appraisal import Appraisal
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer

TOKENS = 16
GAP_S = 0.01  # the profile's wall seconds between tokens (no speed-up from a second thread)
ONE_THREAD = 0.010  # honest CPU-s per token at 1 thread
QUIET = {"others_cores": 0.05, "cpu_pressure": 0.01}  # as the profile's runs saw: no excuse applies


def runs(threads: int, per_token: float, cores: float) -> ThreadRuns:
    return ThreadRuns(
        threads,
        Stats.of([per_token * 0.99, per_token, per_token * 1.01]),
        Stats.of([cores * 0.97, cores, cores * 1.02]),
        {
            "1": Stats.of([per_token * 0.99, per_token * 1.01]),
            "2": Stats.of([per_token * 0.8, per_token * 0.82]),
        },
    )


def profile(table: dict[int, ThreadRuns], default: ThreadRuns) -> Profile:
    """A resident gpt2-micro profile whose top-level fields are the `default` thread count's."""
    return Profile.from_runs(
        f"{this_device()}|resident",
        "gpt2-micro",
        TOKENS,
        intervals=[GAP_S, GAP_S * 1.05],
        cpu_per_token=list(default.cpu_s_per_token.runs),
        busy=list(default.cores_busy.runs),
        memory=[300.0, 310.0],
        peak={"peak_flops_per_s": 1e11, "peak_flops_per_cpu_s": 1e11},
        measured_at=0.0,
        regime="resident",
        batch_cpu_s_per_token=default.batch_cpu_s_per_token,
        conditions={k: Stats.of([v, v]) for k, v in QUIET.items()},
        threads=sorted(table),
        threads_runs={str(t): r for t, r in table.items()},
    )


def layer_with(tmp_path, registry, prof: Profile) -> ThermodynamicLayer:
    store = ProfileStore(tmp_path / "profiles.json")
    store.put(prof)
    return ThermodynamicLayer(registry, store)


def evidence(
    per_token_s: float, cores: float, rss_mb: float = 310.0, contention: dict[str, float] = QUIET
) -> LeaseEvidence:
    """A resident lease streaming TOKENS tokens at `per_token_s` CPU-s each with `cores` busy (the
    gap between tokens follows from both)."""
    gap = per_token_s / cores
    t = [gap * i for i in range(TOKENS)]
    cpu = [per_token_s * i for i in range(TOKENS)]
    return LeaseEvidence(
        started_at=0.0,
        finished_at=1.0,
        wall_s=1.0,
        cpu_s=cpu[-1],
        max_rss_kb=int(rss_mb * 1024),
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
        contention=dict(contention),
    )


def judge(layer: ThermodynamicLayer, ev: LeaseEvidence):
    lease = Lease.issue("a", "gpt2-micro", GenerateJob(prompt="x", max_new_tokens=TOKENS))
    return layer.appraise(Appraisal(lease=lease, raw=b"", evidence=ev))


# measured beside a neighbour: 2-thread runs spun to 4x the 1-thread work with 1.2 cores busy
LOADED_TWO = runs(2, 4 * ONE_THREAD, 1.2)
QUIET_TWO = runs(2, 2 * ONE_THREAD, 1.9)
ONE = runs(1, ONE_THREAD, 0.98)


def test_an_honest_one_thread_agent_is_judged_by_the_one_thread_runs(tmp_path, registry):
    # the case found: the default (2-thread) runs alone would set a floor of 0.35 x 0.0396 = 13.9
    # CPU-ms, above the 10 an honest single-thread agent does
    layer = layer_with(tmp_path, registry, profile({1: ONE, 2: LOADED_TWO}, default=LOADED_TWO))
    r = judge(layer, evidence(ONE_THREAD, cores=1.0))
    assert r.status is Status.PASS, r.reason
    assert "1-thread runs" in r.reason
    assert r.details["floor_threads"] == 1 and r.details["lower_bound_cpu_ms"] < 5.0


def test_without_per_thread_runs_the_same_agent_was_refused(tmp_path, registry):
    # the floor before issue 24, on the same evidence: the default thread count's runs, not scaled
    # (a loaded profile without 1-thread runs cannot be rescued by its work per core either)
    legacy = profile({}, default=LOADED_TWO)
    r = judge(layer_with(tmp_path, registry, legacy), evidence(ONE_THREAD, cores=1.0))
    assert r.status is Status.FAIL and "default-thread runs" in r.reason, r.reason


def test_a_two_thread_agent_is_judged_by_the_two_thread_runs_capped_by_the_work_per_core(tmp_path, registry):
    layer = layer_with(tmp_path, registry, profile({1: ONE, 2: QUIET_TWO}, default=QUIET_TWO))
    r = judge(layer, evidence(2 * ONE_THREAD, cores=1.9))
    assert r.status is Status.PASS, r.reason
    assert r.details["floor_threads"] in (1, 2) and r.details["cores_busy"] == pytest.approx(1.9)
    # a loaded profile's 2-thread runs (4x) would expect more than an honest quiet agent does: the
    # 1-thread runs per core x 1.9 cores take over, and the reason says so
    loaded = layer_with(tmp_path, registry, profile({1: ONE, 2: LOADED_TWO}, default=LOADED_TWO))
    r = judge(loaded, evidence(2 * ONE_THREAD, cores=1.9))
    assert r.status is Status.PASS, r.reason
    assert r.details["floor_per_core"] and "1-thread runs" in r.reason and "x1.90" in r.reason


def test_the_floor_rises_with_the_cores_busy_so_a_parallel_cheat_is_held_to_parallel_work(tmp_path, registry):
    # a model ~5x smaller run at 2 threads: 4 CPU-ms per token with 1.9 cores busy. Against the
    # 1-thread floor (3.5) it would pass; matched to the 2-thread runs it does not
    layer = layer_with(tmp_path, registry, profile({1: ONE, 2: QUIET_TWO}, default=QUIET_TWO))
    cheat = judge(layer, evidence(0.4 * ONE_THREAD, cores=1.9))
    assert cheat.status is Status.FAIL and cheat.reason.startswith("work:"), cheat.reason
    assert "cores this sandbox kept busy" in cheat.reason or "2-thread runs" in cheat.reason
    # the same work on one core is what a model 2.5x smaller costs at 1 thread: L1 leaves it to L4
    one_core = judge(layer, evidence(0.4 * ONE_THREAD, cores=1.0))
    assert one_core.status is Status.PASS, one_core.reason


def test_a_sleeper_is_caught_whatever_the_profile_has(tmp_path, registry):
    layer = layer_with(tmp_path, registry, profile({1: ONE, 2: QUIET_TWO}, default=QUIET_TWO))
    r = judge(layer, evidence(0.02 * ONE_THREAD, cores=0.02))
    assert r.status is Status.FAIL, r.reason


def test_a_batched_window_uses_the_matched_runs_batch_sizes(tmp_path, registry):
    layer = layer_with(tmp_path, registry, profile({1: ONE, 2: QUIET_TWO}, default=QUIET_TWO))
    ev = evidence(0.8 * ONE_THREAD, cores=1.0)
    batched = dataclasses.replace(ev, co_leases=1)
    r = judge(layer, batched)
    assert r.status is Status.PASS, r.reason
    assert r.details["batch"] == 2 and r.details["floor_threads"] == 1
    assert r.details["profile_cpu_ms_per_token"] == pytest.approx(ONE_THREAD * 0.81 * 1000, rel=0.02)


def test_thread_runs_survive_the_store(tmp_path):
    store = ProfileStore(tmp_path / "profiles.json")
    prof = profile({1: ONE, 2: QUIET_TWO}, default=QUIET_TWO)
    store.put(prof)
    back = store.get("gpt2-micro", prof.device_class)
    assert back is not None and back.threads_runs == prof.threads_runs
    assert back.least_cores_busy == pytest.approx(0.98 * 0.97)


@pytest.mark.parametrize(
    ("text", "cpus", "counts"),
    [("1,2,N", 16, (1, 2, 16)), ("1,2,N", 2, (1, 2)), ("N", 4, (4,)), ("4, 1", 8, (1, 4))],
)
def test_thread_counts(text, cpus, counts):
    assert thread_counts(text, cpus) == counts


@pytest.mark.parametrize("bad", ["", "0,1", "one", "1,,x"])
def test_thread_counts_refuse_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="thread counts"):
        thread_counts(bad, 2)


def test_a_work_miss_excused_by_load_still_faces_the_memory_floor(tmp_path, registry):
    # a smaller model on a loaded host: a moderate work miss under contention the profile never saw
    # is a warning, but the weights it does not hold are not the load's doing (found at 1 thread:
    # gpt2-mini claiming gpt2-small was only warned, its 300 MB never judged)
    layer = layer_with(tmp_path, registry, profile({1: ONE, 2: QUIET_TWO}, default=QUIET_TWO))
    loaded = {"others_cores": 1.9, "cpu_pressure": 0.6}
    holding = judge(layer, evidence(0.25 * ONE_THREAD, cores=1.0, contention=loaded))
    assert holding.status is Status.WARN and "never saw" in holding.reason, holding.reason
    light = judge(layer, evidence(0.25 * ONE_THREAD, cores=1.0, rss_mb=200.0, contention=loaded))
    assert light.status is Status.FAIL and light.reason.startswith("memory:"), light.reason


def test_poi_profile_refuses_a_bad_thread_list_before_measuring(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from maxwell_poi.cli import app

    monkeypatch.setenv("POI_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["profile", "gpt2-micro", "--resident", "--threads", "1,two"])
    assert result.exit_code == 2 and "--threads" in result.output, result.output
    assert not (tmp_path / "profiles.json").exists()
