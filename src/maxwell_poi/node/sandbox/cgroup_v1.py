"""Sandbox in a pair of cgroup v1 groups: cpuacct for CPU (ns), memory for memory and its peak."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

from .base import AccountingSource, Sandbox, SandboxTrust, SandboxUnavailable, Usage
from .cgroupfs import (
    cgroup1_mount,
    close_fds,
    make_group,
    mounts_file,
    open_counter,
    pread_int,
    pread_text,
    read_procs,
    remove_group,
    spawn_joined,
    writable,
)

_CPU_FILES = ("cpuacct.usage",)
_MEM_FILES = ("memory.usage_in_bytes",)  # the root group has no max_usage on some kernels


class CgroupV1Sandbox(Sandbox):
    """The agent's tree in <cpuacct>/maxwell-poi/<name> and <memory>/maxwell-poi/<name>.

    Every task that descends from the agent stays in both groups whatever it does to its parentage
    (setsid, double fork), so the kernel's counters cover it. cpuacct.usage is the scheduler's
    per-task runtime summed in ns; memory.usage_in_bytes is the group's charge (RSS and page cache
    the group first touched); memory.max_usage_in_bytes its high-water mark, resettable by writing 0.
    """

    source = AccountingSource.CGROUP_V1
    trust = SandboxTrust.KERNEL_CGROUP
    resolution_ns = 1

    @classmethod
    def _mounts(cls) -> tuple[Path, Path]:
        cpu = cgroup1_mount("cpuacct")
        mem = cgroup1_mount("memory")
        if cpu is None or mem is None:
            missing = " and ".join(c for c, m in (("cpuacct", cpu), ("memory", mem)) if m is None)
            raise SandboxUnavailable(f"cgroup v1: no {missing} hierarchy in {mounts_file()}")
        return cpu, mem

    @classmethod
    def probe(cls) -> str | None:
        try:
            cpu, mem = cls._mounts()
        except SandboxUnavailable as e:
            return str(e)
        for root, files in ((cpu, _CPU_FILES), (mem, _MEM_FILES)):
            for f in files:
                if not (root / f).exists():
                    return f"cgroup v1: {root / f} missing"
            why = writable(root)
            if why:
                return f"cgroup v1: {why}"
        return None

    def __init__(self, label: str) -> None:
        super().__init__(label)
        why = self.probe()
        if why:
            raise SandboxUnavailable(why)
        cpu_root, mem_root = self._mounts()
        try:
            self.cpu_group = make_group(cpu_root, self.name)
        except SandboxUnavailable as e:
            raise SandboxUnavailable(f"cgroup v1: {e}") from e
        # Co-mounted cpuacct and memory share one hierarchy, hence one group.
        self.mem_group: Path | None = self.cpu_group if mem_root == cpu_root else None
        self._fds: list[int] = []
        try:
            if self.mem_group is None:
                self.mem_group = make_group(mem_root, self.name)
            self._cpu_fd = self._keep(self.cpu_group / "cpuacct.usage")
            self._mem_fd = self._keep(self.mem_group / "memory.usage_in_bytes")
            self._peak_fd = self._keep(self.mem_group / "memory.max_usage_in_bytes")
            self._procs_fd = self._keep(self.cpu_group / "cgroup.procs")
        except (OSError, SandboxUnavailable) as e:
            with contextlib.suppress(OSError):
                self._release()
            raise SandboxUnavailable(f"cgroup v1: {e}") from e

    def _keep(self, path: Path) -> int:
        fd = open_counter(path)
        self._fds.append(fd)
        return fd

    @property
    def groups(self) -> list[Path]:
        return [g for g in dict.fromkeys((self.cpu_group, self.mem_group)) if g is not None]

    def _spawn(self, argv: list[str], env: dict[str, str], kw: dict[str, Any]) -> subprocess.Popen[Any]:
        return spawn_joined(self.groups, argv, env, kw)

    def cpu_counter(self) -> str | None:
        return str(self.cpu_group / "cpuacct.usage")  # nanoseconds

    def usage(self) -> Usage:
        self._check_open()
        cpu = pread_int(self._cpu_fd)
        mem = pread_int(self._mem_fd)
        peak = pread_int(self._peak_fd)
        n = len(pread_text(self._procs_fd).split())
        return Usage(cpu, mem, max(peak, mem), n, time.perf_counter())

    def reset_peak(self) -> None:
        self._check_open()
        assert self.mem_group is not None
        (self.mem_group / "memory.max_usage_in_bytes").write_text("0")

    def pids(self) -> list[int]:
        # A task can only be in one group per hierarchy; the union covers a process that someone
        # with our privileges moved out of one of the two groups.
        return sorted({p for g in self.groups for p in read_procs(g)})

    def held(self) -> set[int]:
        # in both groups: one that left cpuacct is no longer charged for CPU, whatever memory says
        groups = [set(read_procs(g)) for g in self.groups]
        return set.intersection(*groups) if groups else set()

    def _members(self) -> list[int]:
        return self.pids()

    def _release(self) -> None:
        close_fds(self._fds)
        self._fds = []
        errors = []
        for g in self.groups:
            try:
                remove_group(g)
            except OSError as e:
                errors.append(f"{g}: {e.strerror or e}")
        if errors:
            raise OSError("; ".join(errors))

    def _paths(self) -> dict[str, str]:
        return {"cpuacct": str(self.cpu_group), "memory": str(self.mem_group)}
