"""CPU time, memory and block I/O of a process tree, as the kernel accounts them (/proc on Linux,
psutil elsewhere)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .sampler import SampledSource, _why
from .trace import Capability, TrustLevel

_IO_NAMES = ("io_read_bytes_per_s", "io_write_bytes_per_s", "io_read_bytes", "io_write_bytes")
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _linux_proc_stat(pid: int) -> tuple[float, float, bytes]:
    """(user+system+reaped children's CPU s, RSS bytes, start time) from one read of /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fl = raw[raw.rindex(b")") + 2 :].split()  # fields after "(comm)": fl[0] is field 3 (state)
    cpu = (int(fl[11]) + int(fl[12]) + int(fl[13]) + int(fl[14])) / _CLK_TCK
    return cpu, float(int(fl[21]) * _PAGE), fl[19]


def _linux_proc_io(pid: int) -> tuple[float, float]:
    """(read_bytes, write_bytes) from /proc/<pid>/io: bytes that reached the storage layer."""
    with open(f"/proc/{pid}/io", "rb") as f:
        kv = dict(line.split(b": ") for line in f.read().splitlines() if b": " in line)
    return float(kv[b"read_bytes"]), float(kv[b"write_bytes"])


class ProcessSource(SampledSource):
    """CPU, memory and block I/O of a process and its descendants, as the kernel accounts them.

    CPU seconds per process are user + system + reaped children's, summed over the live tree, so a
    child that exits and is reaped inside the tree moves its time to its parent without a jump (a
    process that leaves the tree unreaped would make the sum drop; deltas are clamped at 0). The tree
    is listed with psutil every `children_refresh_s` and at begin and end, not at every tick: listing
    scans all of /proc (~1 ms here). A child's CPU is still counted in full once it is seen or reaped
    into the tree; the refresh only delays when it shows in cpu_util. On Linux each tick reads
    /proc/<pid>/stat and /io directly (one file for CPU and RSS; psutil's three reads cost about
    twice as much, and the sampler must stay under 0.5% of a core); elsewhere psutil. Kernel CPU
    accounting ticks at 10 ms, so one 100 ms cpu_util sample is quantised to 0.1 core; cpu_s is exact
    to the tick. rss_mb sums RSS over the tree (shared pages count twice); peak_rss_mb is the largest
    sampled sum, not the kernel's high-water mark.
    """

    name = "process"
    trust = TrustLevel.HOST

    def __init__(
        self, hz: float = 10.0, include_children: bool = True, children_refresh_s: float = 2.0
    ) -> None:
        super().__init__(hz)
        import psutil

        self._psutil = psutil
        self.include_children = include_children
        self.children_refresh_s = children_refresh_s
        self._linux = Path(f"/proc/{os.getpid()}/stat").exists()
        self._root: Any = None
        self._procs: dict[int, Any] = {}  # pid -> psutil.Process
        self._start: dict[int, bytes] = {}  # pid -> start time, to notice a reused pid (Linux path)
        self._io = False
        how = "/proc/<pid>/stat" if self._linux else "psutil cpu_times"
        for name in ("cpu_util", "cpu_s"):
            self._caps[name] = Capability(
                name, True, f"{how}: user+system incl. reaped children, over the tree"
            )
        how = "/proc/<pid>/stat rss" if self._linux else "psutil memory_info().rss"
        self._caps["rss_mb"] = Capability("rss_mb", True, f"{how}, summed over the tree")
        self._caps["peak_rss_mb"] = Capability("peak_rss_mb", True, "max of sampled rss_mb")
        try:
            if self._linux:
                _linux_proc_io(os.getpid())
            else:
                psutil.Process().io_counters()
            io = Capability("io", True, "read_bytes/write_bytes that reached the storage layer")
        except Exception as e:
            io = Capability("io", False, f"io counters: {_why(e)}")
        self._io_available = io.available
        for name in _IO_NAMES:
            self._caps[name] = Capability(name, io.available, io.reason)

    def _series_names(self) -> list[str]:
        names = ["cpu_util", "rss_mb"]
        return [*names, "io_read_bytes_per_s", "io_write_bytes_per_s"] if self._io else names

    def _refresh(self) -> None:
        if self.include_children:
            try:
                for c in self._root.children(recursive=True):
                    self._procs.setdefault(c.pid, c)
            except self._psutil.Error:
                pass
        self._last_refresh = time.monotonic()

    def _read_one(self, pid: int, p: Any) -> tuple[float, float, float, float] | None:
        """Cumulative (cpu_s, rss, read_bytes, write_bytes) of one process; None once it is gone."""
        if self._linux:
            try:
                cpu, rss, start = _linux_proc_stat(pid)
            except (OSError, ValueError, IndexError):
                return None
            if self._start.setdefault(pid, start) != start:
                return None  # the pid now belongs to another process
            rb = wb = 0.0
            if self._io:
                try:
                    rb, wb = _linux_proc_io(pid)
                except (OSError, KeyError, ValueError) as e:
                    self._error(f"io of pid {pid}", e)
            return cpu, rss, rb, wb
        try:
            with p.oneshot():
                ct = p.cpu_times()
                cpu = ct.user + ct.system + ct.children_user + ct.children_system
                rss = float(p.memory_info().rss)
                rb = wb = 0.0
                if self._io:
                    io = p.io_counters()
                    rb, wb = float(io.read_bytes), float(io.write_bytes)
            return cpu, rss, rb, wb
        except self._psutil.NoSuchProcess:
            return None

    def _read(self) -> tuple[float, float, float, float]:
        """Cumulative (cpu_s, rss_bytes, read_bytes, write_bytes) over the tracked tree."""
        cpu = rss = rb = wb = 0.0
        for pid, p in list(self._procs.items()):
            try:
                got = self._read_one(pid, p)
            except self._psutil.AccessDenied as e:
                self._error(f"pid {pid}", e)
                continue
            if got is None:
                del self._procs[pid]
                self._start.pop(pid, None)
                continue
            cpu += got[0]
            rss += got[1]
            rb += got[2]
            wb += got[3]
        return cpu, rss, rb, wb

    def _begin(self, pid: int | None) -> dict[str, float] | None:
        pid = os.getpid() if pid is None else pid
        self.device = f"{platform.node()} pid {pid}"
        self._root = self._psutil.Process(pid)  # NoSuchProcess here is the caller's error: let it raise
        self._procs = {pid: self._root}
        self._start = {}
        self._io = self._io_available
        if self._io:
            try:
                if self._linux:
                    _linux_proc_io(pid)
                else:
                    self._root.io_counters()
            except Exception as e:  # e.g. another user's process
                self._io = False
                for n in _IO_NAMES:
                    self._window_caps[n] = Capability(n, False, f"io counters of pid {pid}: {_why(e)}")
        self._refresh()
        self._prev = self._read()
        self._prev_t = time.monotonic()
        self._acc = [0.0, 0.0, 0.0]  # cpu_s, read_bytes, write_bytes: monotone sums of clamped deltas
        self._peak_rss = self._prev[1]
        return None

    def _before_final(self) -> None:
        self._refresh()

    def _sample(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._last_refresh >= self.children_refresh_s:
            self._refresh()
        cur = self._read()
        dt = max(now - self._prev_t, 1e-9)
        d_cpu, d_rb, d_wb = (max(0.0, cur[i] - self._prev[i]) for i in (0, 2, 3))
        self._acc[0] += d_cpu
        self._acc[1] += d_rb
        self._acc[2] += d_wb
        self._prev, self._prev_t = cur, now
        self._peak_rss = max(self._peak_rss, cur[1])
        row = {"cpu_util": d_cpu / dt, "rss_mb": cur[1] / 2**20}
        if self._io:
            row["io_read_bytes_per_s"] = d_rb / dt
            row["io_write_bytes_per_s"] = d_wb / dt
        return row

    def _totals(self, t: np.ndarray, series: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
        totals = {"cpu_s": self._acc[0], "peak_rss_mb": self._peak_rss / 2**20}
        if self._io:
            totals["io_read_bytes"] = self._acc[1]
            totals["io_write_bytes"] = self._acc[2]
        return totals
