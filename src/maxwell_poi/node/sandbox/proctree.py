"""Fallback sandbox with no cgroup: the agent's process tree as /proc shows it.

Weaker than a cgroup in two ways, and `trust` says so: CPU comes in clock ticks (10 ms at
CLK_TCK=100), and a process that leaves the tree before a reading has seen it (double fork + setsid,
the orphan reparented to init) is not counted at all.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from ...observer.telemetry.process import _CLK_TCK, _linux_proc_stat
from .base import SANDBOX_ENV, AccountingSource, Sandbox, SandboxTrust, Usage
from .processes import carrying

_LINUX = os.path.exists("/proc/self/stat")


@dataclass
class _Seen:
    start: bytes  # start time: a different one means the pid was reused
    ppid: int  # parent when last seen
    cpu_s: float  # user+system+reaped children when last seen


def _stat(pid: int) -> tuple[float, float, bytes] | None:
    """(cpu_s incl. reaped children, rss bytes, start time), or None once the pid is gone."""
    if _LINUX:
        try:
            return _linux_proc_stat(pid)
        except (OSError, ValueError, IndexError):
            return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return (
                t.user + t.system + t.children_user + t.children_system,
                float(p.memory_info().rss),
                repr(p.create_time()).encode(),
            )
    except psutil.Error:
        return None


def _task_children(pid: int) -> list[int]:
    """Children of `pid` from /proc/<pid>/task/*/children: cost grows with the tree, not the system."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _children_lister() -> Callable[[int], list[int]]:
    """pid -> children, from the per-task children files where the kernel has them
    (CONFIG_PROC_CHILDREN), else from one psutil scan of every process."""
    if _LINUX and os.path.exists(f"/proc/self/task/{os.getpid()}/children"):
        return _task_children
    kids: dict[int, list[int]] = defaultdict(list)
    for p in psutil.process_iter(["ppid"]):
        kids[p.info["ppid"]].append(p.pid)
    return lambda pid: kids.get(pid, [])


class ProcTreeSandbox(Sandbox):
    """The spawned process, every process seen in its tree that still runs, and their descendants.

    CPU is summed over that live set (user+system+reaped children, from /proc/<pid>/stat), plus the
    last reading of each process that has since gone, unless its parent is still in the set: a parent
    that reaps a child adds the child's full time to its own children's time, so keeping both would
    count it twice. The total is clamped so it never goes backwards (a child reaped with SIGCHLD
    ignored hands its time to no one). Memory is summed RSS (shared pages count twice); the peak is
    the largest sum a reading saw. A reading walks the tree through /proc/<pid>/task/*/children
    (all of /proc where the kernel lacks those files).

    close() also kills processes that carry this sandbox's environment marker, share the agent's
    session, or (confined) hold the sandbox's uid: that finds a double-forked child that left the
    tree (escapes.py reports it). Accounting uses none of these (an agent controls its environment
    and its session; the tree is what /proc can attribute CPU to).
    """

    source = AccountingSource.PROC
    trust = SandboxTrust.PROC_TREE
    resolution_ns = 1_000_000_000 // _CLK_TCK

    @classmethod
    def probe(cls) -> str | None:
        return None if _stat(os.getpid()) is not None else "proc: cannot read this process's CPU times"

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self._seen: dict[int, _Seen] = {}
        self._gone_cpu_s = 0.0  # CPU of processes that went away with no tracked parent to absorb it
        self._last_cpu_ns = 0
        self._peak = 0

    def _spawn(self, argv: list[str], env: dict[str, str], kw: dict[str, Any]) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, env=env, **kw)
        got = _stat(proc.pid)
        if got is not None:  # pin the root's identity now, before its pid could be reused
            self._seen[proc.pid] = _Seen(got[2], os.getpid(), got[0])
        return proc

    def _scan(self) -> tuple[float, float, list[int]]:
        """Update what we track; (cpu_s of the live set, summed rss, live pids)."""
        kids = _children_lister()
        live: dict[int, tuple[float, float]] = {}
        stack: list[tuple[int, int]] = []  # (pid, parent)
        for pid, seen in self._seen.items():  # tracked processes still running seed the walk
            got = _stat(pid)
            if got is not None and got[2] == seen.start:
                live[pid] = got[0], got[1]
                seen.cpu_s = got[0]
                stack.extend((c, pid) for c in kids(pid))
        while stack:
            pid, parent = stack.pop()
            seen = self._seen.get(pid)
            if seen is not None:
                seen.ppid = parent  # reparented inside the tree
            if pid in live:
                continue
            got = _stat(pid)
            if got is None:
                continue
            live[pid] = got[0], got[1]
            self._seen[pid] = _Seen(got[2], parent, got[0])
            stack.extend((c, pid) for c in kids(pid))
        for pid in [p for p in self._seen if p not in live]:
            seen = self._seen.pop(pid)
            if seen.ppid not in live:  # nobody in the tree reaped it: keep its last reading
                self._gone_cpu_s += seen.cpu_s
        cpu = sum(c for c, _ in live.values())
        rss = sum(r for _, r in live.values())
        return cpu, rss, sorted(live)

    def usage(self) -> Usage:
        self._check_open()
        cpu_s, rss, live = self._scan()
        cpu_ns = max(self._last_cpu_ns, round((cpu_s + self._gone_cpu_s) * 1e9))
        self._last_cpu_ns = cpu_ns
        mem = int(rss)
        self._peak = max(self._peak, mem)
        return Usage(cpu_ns, mem, self._peak, len(live), time.perf_counter())

    def reset_peak(self) -> None:
        self._check_open()
        self._peak = 0  # the next usage() sets it to the then-current memory

    def pids(self) -> list[int]:
        return self._scan()[2]

    def _tagged(self) -> list[int]:
        """Processes whose environment carries this sandbox's marker (Linux only)."""
        return sorted(carrying(f"{SANDBOX_ENV}={self.name}".encode())) if _LINUX else []

    def _members(self) -> list[int]:
        return sorted(set(self._scan()[2]) | set(self._tagged()))

    def _release(self) -> None:
        self._seen.clear()
