"""What every agent sandbox offers: one long-lived process tree, measured by one kernel accounting
source, and torn down completely on close."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from .confine import Confinement
from .escapes import Escape, Kin, Left, escape, find_escapes, recognise
from .processes import ProcessInfo, carrying, process_table, read_process


class AccountingSource(StrEnum):
    """Where a sandbox's CPU and memory figures come from."""

    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1 = "cgroup-v1"
    PROC = "proc"


class SandboxTrust(StrEnum):
    """How far a sandbox's figures can be trusted to cover everything the agent ran."""

    # The kernel charges every task in the group, whatever it does to its parentage.
    KERNEL_CGROUP = "kernel-cgroup"
    # A walk of the process tree: a double-forked / setsid child that leaves the tree before it is
    # seen escapes it, and CPU is quantised to the 10 ms clock tick.
    PROC_TREE = "proc-tree"


TRUST_RANK: dict[SandboxTrust, int] = {SandboxTrust.PROC_TREE: 0, SandboxTrust.KERNEL_CGROUP: 1}

# Environment marker put on every agent, so close() can find processes that left the tree.
SANDBOX_ENV = "MAXWELL_POI_SANDBOX"


class SandboxUnavailable(RuntimeError):
    """This accounting source cannot be used on this machine; the message says why."""


@dataclass(frozen=True)
class Usage:
    """One reading of a sandbox's kernel accounting."""

    cpu_ns: int  # cumulative user+system of the whole sandbox since creation
    memory_bytes: int  # current
    peak_memory_bytes: int  # high-water since creation or last reset_peak(); -1 if unknown
    pids: int  # live processes in the sandbox
    at: float  # time.perf_counter() when read

    @property
    def cpu_s(self) -> float:
        return self.cpu_ns / 1e9


def unique_name(label: str) -> str:
    """`label` made safe for a directory name, plus a random suffix so two sandboxes never collide."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:64] or "agent"
    return f"{safe}-{secrets.token_hex(4)}"


def pid_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts as gone: it runs nothing and holds no memory)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return True
    return raw[raw.rindex(b")") + 2 : raw.rindex(b")") + 3] in (b"Z", b"X")


def kill_pid(pid: int) -> None:
    """SIGKILL, ignoring processes that are already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, 9)


class Sandbox(ABC):
    """One agent's process tree, measured as a whole.

    Subclasses provide the accounting (`usage`, `pids`, `reset_peak`), how a child joins the
    sandbox before exec (`_spawn`), and how everything is found and released on close.
    """

    source: ClassVar[AccountingSource]
    trust: ClassVar[SandboxTrust]
    resolution_ns: ClassVar[int]  # declared resolution of cpu_ns

    def __init__(self, label: str) -> None:
        self.label = label
        self.name = unique_name(label)
        self.fallback_reason: str | None = None  # why better sources were not used (set by open_sandbox)
        self.close_error: str | None = None
        self._proc: subprocess.Popen[Any] | None = None
        self._root_start = -1
        self._closed = False
        # its own uid, namespaces and file view when the node can give them, else why not
        self.confinement = Confinement(self.name, label)
        self._escapes: dict[tuple[int, int], Escape] = {}  # every escape attempt seen, by identity

    # -- probing ---------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def probe(cls) -> str | None:
        """None if this source is usable here, else why not (no side effects)."""

    # -- the agent -------------------------------------------------------------------------------
    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start the agent inside the sandbox: it and all its descendants are accounted from their
        first instruction. A sandbox holds one root process."""
        if self._closed:
            raise RuntimeError(f"sandbox {self.name} is closed")
        if self._proc is not None:
            raise RuntimeError(f"sandbox {self.name} already holds pid {self._proc.pid}")
        full_env = dict(os.environ if env is None else env)
        full_env[SANDBOX_ENV] = self.name
        proc = None
        try:
            wrapped, full_env, kw = self.confinement.wrap(list(argv), full_env, popen_kwargs)
            try:
                proc = self._spawn(wrapped, full_env, kw)
                root = read_process(proc.pid)
                self._root_start = root.start if root is not None else -1
            finally:
                self.confinement.started(proc)  # raises, with the agent killed, if confining failed
        except BaseException:
            self.confinement.release()  # nothing of the agent runs: its folders go back now
            raise
        self._proc = proc
        return proc

    @property
    def process(self) -> subprocess.Popen[Any] | None:
        return self._proc

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the root process to exit, take one last reading while it is still a zombie, then
        reap it and return its exit code. The /proc fallback needs this: once a process is reaped its
        final CPU times are gone from /proc (Popen.wait() alone would lose the tail since the last
        reading). Descendants are not waited for."""
        if self._proc is None:
            raise RuntimeError(f"sandbox {self.name} has not spawned anything")
        if self._proc.returncode is None and hasattr(os, "waitid"):
            deadline = None if timeout is None else time.monotonic() + timeout
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT  # WNOWAIT: leave it a zombie for usage()
            try:
                while os.waitid(os.P_PID, self._proc.pid, flags) is None:
                    if deadline is not None and time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(self._proc.args, timeout or 0.0)
                    time.sleep(0.002)
            except ChildProcessError:
                pass  # already reaped by someone else
            if not self._closed:
                self.usage()
        return self._proc.wait(timeout)

    @abstractmethod
    def _spawn(self, argv: list[str], env: dict[str, str], kw: dict[str, Any]) -> subprocess.Popen[Any]: ...

    # -- accounting ------------------------------------------------------------------------------
    @abstractmethod
    def usage(self) -> Usage: ...

    def cpu_counter(self) -> str | None:
        """A file holding the sandbox's cumulative CPU (what `usage()` reads), for a reader of Maxwell's
        outside this process (node.stamper); None where the CPU is summed from /proc instead."""
        return None

    @abstractmethod
    def reset_peak(self) -> None: ...

    @abstractmethod
    def pids(self) -> list[int]: ...

    def held(self) -> set[int]:
        """Processes the sandbox's accounting fully holds: one missing from here is (partly) not
        charged. The same as `pids()` where one group or one tree does the accounting."""
        return set(self.pids())

    # -- escapes ---------------------------------------------------------------------------------
    def _kin(self) -> Kin | None:
        if self._proc is None:
            return None
        return Kin(
            root=self._proc.pid,
            root_start=self._root_start,
            uid=self.confinement.uid,
            held=frozenset(self.held()),
            kernel_held=self.trust is SandboxTrust.KERNEL_CGROUP,
            marked=frozenset(carrying(f"{SANDBOX_ENV}={self.name}".encode())),
        )

    def check_escapes(self) -> tuple[Escape, ...]:
        """Look now for the agent's processes outside the sandbox (escapes.py says how they are
        recognised; a few ms for a few hundred host processes); one outside the cgroup is killed on
        sight. Returns every escape attempt seen since spawn: once an agent tried, every later lease
        carries it. The node calls this at each lease's end and at close."""
        # the process table first, the cgroup's members after: a process the agent forks in
        # between is in neither (it is seen next time), never a member the table calls outside
        table = process_table()
        kin = self._kin()
        if kin is None or self._closed:
            return tuple(self._escapes.values())
        for info, left, how in find_escapes(kin, table):
            if info.identity in self._escapes:
                continue
            on_sight = left is Left.CGROUP
            if on_sight and not self._still_outside(info):
                continue  # it exited (or its pid was reused) between the two readings
            if on_sight:
                kill_pid(info.pid)
            self._escapes[info.identity] = escape(info, left, how, killed=on_sight)
        return tuple(self._escapes.values())

    def _still_outside(self, info: ProcessInfo) -> bool:
        """Confirms an escape from the cgroup before the kill: the same process still lives and the
        sandbox's accounting does not hold it on a second reading."""
        now = read_process(info.pid)
        return now is not None and now.identity == info.identity and info.pid not in self.held()

    @property
    def escapes(self) -> tuple[Escape, ...]:
        return tuple(self._escapes.values())

    def _strays(self) -> set[int]:
        """Every live process recognised as the agent's, wherever it is (close kills them all)."""
        kin = self._kin()
        if kin is None:
            return set()
        return set(recognise(kin, process_table())) - {os.getpid()}

    # -- teardown --------------------------------------------------------------------------------
    @abstractmethod
    def _members(self) -> list[int]:
        """Every live process that close() must kill (may include ones outside `pids()`)."""

    def _kill_members(self) -> None:
        """SIGKILL every member; subclasses may have a faster atomic way (cgroup.kill)."""
        for pid in self._members():
            kill_pid(pid)

    @abstractmethod
    def _release(self) -> None:
        """Free kernel objects (cgroup dirs, file descriptors) once nothing is left running."""

    def close(self, timeout: float = 5.0) -> None:
        """Kill every process still in the sandbox, wait for them, release the sandbox. Idempotent."""
        if self._closed:
            return
        self.check_escapes()  # before anything is killed: what left, and how
        self._closed = True
        deadline = time.monotonic() + timeout
        # Loop: a member may fork between our read of the member list and the kill.
        while True:
            self._kill_members()
            for pid in self._strays():
                kill_pid(pid)
            if self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.05)
            left = [p for p in set(self._members()) | self._strays() if not pid_gone(p)]
            if not left:
                break
            if time.monotonic() > deadline:
                self.close_error = f"processes survived SIGKILL for {timeout:.1f} s: {left}"
                warnings.warn(f"sandbox {self.name}: {self.close_error}", RuntimeWarning, stacklevel=2)
                break
            time.sleep(0.005)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        try:
            self._release()
        except OSError as e:
            self.close_error = f"release: {e}"
            warnings.warn(f"sandbox {self.name}: {self.close_error}", RuntimeWarning, stacklevel=2)
        self.confinement.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"sandbox {self.name} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": str(self.source),
            "trust": str(self.trust),
            "resolution_ns": self.resolution_ns,
            "paths": self._paths(),
            "fallback_reason": self.fallback_reason,
            "close_error": self.close_error,
            "confinement": self.confinement.describe(),
            "escapes": [e.reason for e in self._escapes.values()],
        }

    def _paths(self) -> dict[str, str]:
        return {}
