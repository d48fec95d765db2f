"""Agent sandboxes: every accounting source this machine offers (cgroup v2, v1, and always the /proc
fallback) counts a child's CPU and memory, sees or misses a double-forked grandchild as its trust
level says, and leaves nothing behind on close."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from maxwell_poi.node.sandbox import (
    TRUST_RANK,
    AccountingSource,
    Sandbox,
    SandboxTrust,
    available_sources,
    cgroupfs,
    measure_resolution,
    open_sandbox,
)
from maxwell_poi.node.sandbox.base import pid_gone, unique_name

AVAILABLE = available_sources()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MB = 1 << 20
# The proc source is the fallback every machine has: its test ids say so.
IDS = {s: ("proc-fallback" if s is AccountingSource.PROC else s.value) for s in AccountingSource}

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
HOLD = """
import sys, time
b = bytearray(50 << 20)
for i in range(0, len(b), 4096):  # touch every page: calloc'd pages are not resident until written
    b[i] = 1
print("held", flush=True)
sys.stdin.readline()
del b
print("freed", flush=True)
sys.stdin.readline()
"""
# The root forks an intermediate that calls setsid and forks the grandchild, then exits at once: the
# grandchild is reparented to init and is no longer in the root's process tree. It busy-loops
# (bounded, in case a test fails before close) and the root reports its pid, then idles.
ESCAPE = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.write(w, b"%d\\n" % os.getpid())
    t = time.process_time()
    while time.process_time() - t < 20:
        pass
    os._exit(0)
os.wait()
print(os.read(r, 64).decode().strip(), flush=True)
time.sleep(60)
"""


def _open(source: AccountingSource) -> Sandbox:
    why = AVAILABLE[source]
    if why is not None:
        pytest.skip(f"{source} unavailable here: {why}")
    sb = open_sandbox("test sandbox", prefer=source)
    if sb.source is not source:
        reason = sb.fallback_reason
        sb.close()
        if IN_CI:
            pytest.skip(f"{source} could not be created here: {reason}")
        pytest.fail(f"{source} probed usable but could not be created: {reason}")
    return sb


def _assert_released(sb: Sandbox) -> None:
    for path in sb.describe()["paths"].values():
        assert not Path(path).exists(), f"{path} left behind"


@pytest.fixture(params=list(AccountingSource), ids=lambda s: IDS[s])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    sb = _open(request.param)
    if sb.source is AccountingSource.PROC:
        print(f"proc fallback: {sb.describe()}")
    try:
        yield sb
    finally:
        sb.close()
        _assert_released(sb)


def test_cpu_of_a_burning_child_is_counted(sandbox: Sandbox) -> None:
    before = sandbox.usage()
    sandbox.spawn([sys.executable, "-c", BURN.format(s=0.3)])
    assert sandbox.wait(timeout=30) == 0
    spent = sandbox.usage().cpu_s - before.cpu_s
    assert 0.2 <= spent <= 1.0, f"{sandbox.source}: {spent:.3f} s for a 0.3 s burn"


def test_memory_and_peak_of_a_child_holding_50_mb(sandbox: Sandbox) -> None:
    child = sandbox.spawn([sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == b"held"
    held = sandbox.usage()
    assert held.pids == 1 and sandbox.pids() == [child.pid]
    assert held.memory_bytes >= 45 * MB, f"{sandbox.source}: {held.memory_bytes / MB:.1f} MB"
    assert held.peak_memory_bytes == -1 or held.peak_memory_bytes >= held.memory_bytes
    child.stdin.write(b"\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == b"freed"
    freed = sandbox.usage()
    assert freed.memory_bytes < held.memory_bytes - 40 * MB
    if held.peak_memory_bytes >= 0:
        assert freed.peak_memory_bytes >= held.memory_bytes  # the high-water mark survives the free
        sandbox.reset_peak()
        after = sandbox.usage()
        if getattr(sandbox, "peak_resettable", True):
            assert after.peak_memory_bytes < held.memory_bytes - 40 * MB
    child.stdin.close()
    sandbox.wait(timeout=30)


def test_escaped_grandchild(sandbox: Sandbox) -> None:
    root = sandbox.spawn([sys.executable, "-c", ESCAPE], stdout=subprocess.PIPE)
    assert root.stdout is not None
    gc = int(root.stdout.readline())
    gproc = psutil.Process(gc)
    assert gproc.ppid() != root.pid  # it really left the tree
    deadline = time.monotonic() + 10
    while sum(gproc.cpu_times()[:2]) < 0.3 and time.monotonic() < deadline:
        time.sleep(0.02)
    gc_cpu = sum(gproc.cpu_times()[:2])
    assert gc_cpu >= 0.3, "grandchild did not get CPU (machine too loaded?)"
    u = sandbox.usage()
    if sandbox.trust is SandboxTrust.KERNEL_CGROUP:
        assert gc in sandbox.pids()
        assert u.pids == 2
        assert u.cpu_s >= gc_cpu - 0.02, f"{u.cpu_s:.3f} s counted, grandchild alone used {gc_cpu:.3f}"
    else:
        # The gap that makes /proc the lower trust level: the escaped grandchild is invisible.
        print(f"proc fallback misses escaped grandchild: counted {u.cpu_s:.3f} s, it used {gc_cpu:.3f} s")
        assert gc not in sandbox.pids()
        assert u.cpu_s < gc_cpu
    sandbox.close()
    assert pid_gone(gc), "close() left the escaped grandchild running"
    assert pid_gone(root.pid)
    _assert_released(sandbox)
    sandbox.close()  # idempotent


def test_resolution_and_describe(sandbox: Sandbox) -> None:
    r = measure_resolution(sandbox, seconds=0.2)
    print(f"{sandbox.source}: cpu_accounting_resolution_s={r:.6g} (declared {sandbox.resolution_ns} ns)")
    assert sandbox.resolution_ns / 1e9 <= r < 0.1
    d = sandbox.describe()
    assert d["source"] == sandbox.source.value and d["trust"] == sandbox.trust.value
    assert set(d) >= {"source", "trust", "resolution_ns", "paths", "fallback_reason"}


def test_proc_fallback_always_runs() -> None:
    with open_sandbox("agent/1 ünïcode", prefer=AccountingSource.PROC) as sb:
        print(f"proc fallback: {sb.describe()}")
        assert sb.source is AccountingSource.PROC and sb.trust is SandboxTrust.PROC_TREE
        assert TRUST_RANK[sb.trust] < TRUST_RANK[SandboxTrust.KERNEL_CGROUP]
        sb.spawn([sys.executable, "-c", BURN.format(s=0.05)])
        assert sb.wait(timeout=30) == 0
        assert sb.usage().cpu_ns > 0
        with pytest.raises(RuntimeError, match="already holds"):
            sb.spawn([sys.executable, "-c", "pass"])
    with pytest.raises(RuntimeError, match="closed"):
        sb.usage()


def test_names_are_sanitized_and_unique() -> None:
    a, b = unique_name("agent/1 ünï"), unique_name("agent/1 ünï")
    assert a != b and a.startswith("agent_1__n_-")
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in a)


def test_forced_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POI_SANDBOX", "bogus")
    with pytest.raises(RuntimeError, match=r"POI_SANDBOX='bogus': expected one of "):
        open_sandbox("x")
    monkeypatch.setenv("POI_SANDBOX", "proc")
    with open_sandbox("x", prefer=AccountingSource.CGROUP_V1) as sb:
        assert sb.source is AccountingSource.PROC
    for source, why in AVAILABLE.items():
        if why is not None:
            monkeypatch.setenv("POI_SANDBOX", source.value)
            with pytest.raises(RuntimeError, match=f"expected {source.value}") as e:
                open_sandbox("x")
            assert why in str(e.value)


def test_fallback_reasons_on_a_machine_without_cgroups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detection reads /proc/self/mounts: a v2 mount without the memory controller (as on this
    development VM) and no v1 hierarchies leave only proc, and the sandbox says why."""
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("hugetlb\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\ncgroup2 {v2} cgroup2 rw,relatime 0 0\n")
    monkeypatch.setattr(cgroupfs, "MOUNTS", str(mounts))
    got = available_sources()
    assert (
        got[AccountingSource.CGROUP_V2] == f"cgroup v2: no memory controller in {v2} (controllers: hugetlb)"
    )
    assert "no cpuacct and memory hierarchy" in str(got[AccountingSource.CGROUP_V1])
    assert got[AccountingSource.PROC] is None
    with open_sandbox("x") as sb:
        assert sb.source is AccountingSource.PROC
        assert sb.fallback_reason is not None
        assert "cgroup v2: no memory controller" in sb.fallback_reason
        assert "cgroup v1: no cpuacct and memory hierarchy" in sb.fallback_reason


def test_leftover_parent_is_reused() -> None:
    usable = [s for s, why in AVAILABLE.items() if why is None and s is not AccountingSource.PROC]
    if not usable:
        pytest.skip("no cgroup source usable here: " + "; ".join(str(w) for w in AVAILABLE.values() if w))
    for source in usable:
        with _open(source) as first, _open(source) as second:
            assert first.name != second.name
            parents = {Path(p).parent for p in first.describe()["paths"].values()}
            assert all(p.name == cgroupfs.PARENT for p in parents)
        assert all(p.is_dir() for p in parents)  # close() removed only its own group
        _assert_released(first)
        _assert_released(second)
