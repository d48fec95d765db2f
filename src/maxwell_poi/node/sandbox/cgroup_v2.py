"""Sandbox in one cgroup v2 group: cpu.stat usage_usec for CPU, memory.current / memory.peak."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .base import AccountingSource, Sandbox, SandboxTrust, SandboxUnavailable, Usage
from .cgroupfs import (
    PARENT,
    cgroup2_mount,
    close_fds,
    make_group,
    mounts_file,
    pread_int,
    pread_text,
    read_procs,
    remove_group,
    spawn_joined,
    writable,
)


def _controllers(path: Path) -> set[str]:
    try:
        return set((path / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _enable(group: Path, controllers: tuple[str, ...]) -> str | None:
    """Enable `controllers` for `group`'s children; None on success, else why not.

    v2 lets a group hand a controller to its children only if it has no processes of its own (the
    root excepted), which is why the agents live two levels down, under an empty maxwell-poi group.
    """
    try:
        have = set((group / "cgroup.subtree_control").read_text().split())
    except OSError as e:
        return f"{group}/cgroup.subtree_control: {e.strerror or e}"
    for c in controllers:
        if c in have:
            continue
        try:
            (group / "cgroup.subtree_control").write_text(f"+{c}")
        except OSError as e:
            return f"cannot enable +{c} in {group}/cgroup.subtree_control: {e.strerror or e}"
    return None


class CgroupV2Sandbox(Sandbox):
    """The agent's tree in <cgroup2 mount>/maxwell-poi/<name>.

    CPU is cpu.stat usage_usec (core v2 accounting, present with or without the cpu controller);
    memory needs the memory controller: memory.current and memory.peak (kernel >= 5.19; -1 before).
    memory.peak is reset per open file (kernel >= 6.12): the sandbox keeps one fd, writes the reset
    through it and reads the peak through it, so the reset is private to this sandbox.
    """

    source = AccountingSource.CGROUP_V2
    trust = SandboxTrust.KERNEL_CGROUP
    resolution_ns = 1000

    @classmethod
    def _mount(cls) -> Path:
        root = cgroup2_mount()
        if root is None:
            raise SandboxUnavailable(f"cgroup v2: no cgroup2 mount in {mounts_file()}")
        return root

    @classmethod
    def probe(cls) -> str | None:
        try:
            root = cls._mount()
        except SandboxUnavailable as e:
            return str(e)
        have = _controllers(root)
        if "memory" not in have:
            listed = ", ".join(sorted(have)) or "none"
            return f"cgroup v2: no memory controller in {root} (controllers: {listed})"
        if not (root / "cgroup.procs").exists():
            return f"cgroup v2: {root}/cgroup.procs missing"
        why = writable(root)
        return f"cgroup v2: {why}" if why else None

    def __init__(self, label: str) -> None:
        super().__init__(label)
        why = self.probe()
        if why:
            raise SandboxUnavailable(why)
        root = self._mount()
        parent = root / PARENT
        why = _enable(root, ("memory",))
        if why is None:
            try:
                parent.mkdir(exist_ok=True)  # a leftover parent from an earlier run is reused
            except OSError as e:
                why = f"cannot create {parent}: {e.strerror or e}"
        why = why or _enable(parent, ("memory",))
        if why:
            raise SandboxUnavailable(f"cgroup v2: {why}")
        for g in (root, parent):  # cpu is optional: usage_usec needs no controller
            if "cpu" in _controllers(g):
                _enable(g, ("cpu",))
        try:
            self.group = make_group(root, self.name)
        except SandboxUnavailable as e:
            raise SandboxUnavailable(f"cgroup v2: {e}") from e
        self._fds: list[int] = []
        self._peak_fd = -1
        self.peak_resettable = False
        try:
            if not (self.group / "memory.current").exists():
                raise SandboxUnavailable(f"{self.group}/memory.current missing")
            self._cpu_fd = self._keep(self.group / "cpu.stat", os.O_RDONLY)
            self._mem_fd = self._keep(self.group / "memory.current", os.O_RDONLY)
            self._procs_fd = self._keep(self.group / "cgroup.procs", os.O_RDONLY)
            if (self.group / "memory.peak").exists():
                try:
                    self._peak_fd = self._keep(self.group / "memory.peak", os.O_RDWR)
                except OSError:  # read-only before kernel 6.12
                    self._peak_fd = self._keep(self.group / "memory.peak", os.O_RDONLY)
        except (OSError, SandboxUnavailable) as e:
            with contextlib.suppress(OSError):
                self._release()
            raise SandboxUnavailable(f"cgroup v2: {e}") from e

    def _keep(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _spawn(self, argv: list[str], env: dict[str, str], kw: dict[str, Any]) -> subprocess.Popen[Any]:
        return spawn_joined([self.group], argv, env, kw)

    def cpu_counter(self) -> str | None:
        return str(self.group / "cpu.stat")  # its "usage_usec N" line

    def usage(self) -> Usage:
        self._check_open()
        stat = pread_text(self._cpu_fd)
        # First line is "usage_usec N"; search anyway in case a kernel reorders the keys.
        i = stat.index(b"usage_usec ") + len(b"usage_usec ")
        cpu_ns = int(stat[i : stat.index(b"\n", i)]) * 1000
        mem = pread_int(self._mem_fd)
        peak = max(pread_int(self._peak_fd), mem) if self._peak_fd >= 0 else -1
        n = len(pread_text(self._procs_fd).split())
        return Usage(cpu_ns, mem, peak, n, time.perf_counter())

    def reset_peak(self) -> None:
        """Reset memory.peak through our own fd (kernel >= 6.12); a no-op before, peak stays
        since-creation (see `peak_resettable`)."""
        self._check_open()
        if self._peak_fd < 0:
            return
        try:
            os.write(self._peak_fd, b"reset\n")
            self.peak_resettable = True
        except OSError:
            self.peak_resettable = False

    def pids(self) -> list[int]:
        return sorted(read_procs(self.group))

    def _members(self) -> list[int]:
        return self.pids()

    def _kill_members(self) -> None:
        # cgroup.kill (kernel >= 5.14) kills the whole group atomically, forks in flight included.
        try:
            (self.group / "cgroup.kill").write_text("1")
        except OSError:
            super()._kill_members()

    def _release(self) -> None:
        close_fds(self._fds)
        self._fds = []
        self._peak_fd = -1
        remove_group(self.group)

    def _paths(self) -> dict[str, str]:
        return {"cgroup": str(self.group)}
