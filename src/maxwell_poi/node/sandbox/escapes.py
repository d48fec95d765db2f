"""Escape attempts: one of the agent's processes found outside what the sandbox measures and stops.

The node recognises the agent's processes by everything it knows, not by what measures them: the
cgroup's members (or the /proc tree's), the session the agent leads, its process tree, the
sandbox's own uid when confined, and (at close) the environment marker. One of them found

- outside the cgroup has left kernel accounting (only a privileged process can move itself; a
  confined agent's write to cgroup.procs is refused): the node kills it at once;
- in a session of its own has called setsid (a daemon in the making: double fork + setsid, nohup);
- re-parented outside the agent's tree while the agent runs has double-forked away.

Each is evidence of an escape attempt; an honest agent starts no process that outlives its parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from .processes import ProcessInfo, descendants


class Left(StrEnum):
    """What the process left."""

    CGROUP = "the sandbox's cgroup"
    SESSION = "the agent's session"
    TREE = "the agent's process tree"


@dataclass(frozen=True)
class Kin:
    """How to recognise one agent's processes wherever they went."""

    root: int  # the agent's first process (it leads its own session: session id = root)
    root_start: int  # its start time: a reused pid is not the agent
    uid: int | None  # the sandbox's own uid when confined, else None (the node's uid is shared)
    held: frozenset[int]  # what the sandbox's accounting holds now (cgroup members, or the tree)
    kernel_held: bool  # held by a cgroup: a process outside it is not charged
    marked: frozenset[int] = frozenset()  # carrying the sandbox's environment marker

    @property
    def session(self) -> int:
        return self.root

    def reused(self, table: dict[int, ProcessInfo]) -> bool:
        """The root's pid now names another process: neither its tree nor its session is the agent's
        (a session id is not reused while any process of the session lives)."""
        info = table.get(self.root)
        return info is not None and info.start != self.root_start

    def tree(self, table: dict[int, ProcessInfo]) -> set[int]:
        return set() if self.reused(table) else descendants(table, self.root)


@dataclass(frozen=True)
class Escape:
    pid: int
    start: int  # with the pid, the process's identity
    name: str
    left: Left
    recognised_by: str  # how the node knew it was the agent's
    seen_at: float  # unix seconds
    killed: bool  # killed on sight (it had left kernel accounting)

    @property
    def reason(self) -> str:
        killed = "; killed on sight" if self.killed else "; killed at close"
        return f"pid {self.pid} ({self.name}) left {self.left} (recognised by {self.recognised_by}){killed}"


def recognise(kin: Kin, table: dict[int, ProcessInfo]) -> dict[int, str]:
    """Every live process that is the agent's, with how it was recognised (the first way that did)."""
    found: dict[int, str] = {}
    for pid in kin.tree(table):
        found.setdefault(pid, "its ancestry")
    for pid in kin.held:
        found.setdefault(pid, "the sandbox's accounting")
    same_session = not kin.reused(table)
    for info in table.values():
        if same_session and info.session == kin.session:
            found.setdefault(info.pid, f"its session {kin.session}")
        elif kin.uid is not None and info.uid == kin.uid:
            found.setdefault(info.pid, f"the sandbox's uid {kin.uid}")
    for pid in kin.marked:
        found.setdefault(pid, "the sandbox's environment marker")
    return {pid: how for pid, how in found.items() if pid in table}


def find_escapes(kin: Kin, table: dict[int, ProcessInfo]) -> list[tuple[ProcessInfo, Left, str]]:
    """The agent's processes outside the sandbox: (process, what it left, how it was recognised)."""
    tree = kin.tree(table)
    out = []
    for pid, how in recognise(kin, table).items():
        info = table[pid]
        if kin.kernel_held and pid not in kin.held:
            out.append((info, Left.CGROUP, how))
        elif info.session != kin.session:
            out.append((info, Left.SESSION, how))
        elif tree and pid not in tree:  # only while the agent runs: its tree is gone after
            out.append((info, Left.TREE, how))
    return out


def escape(info: ProcessInfo, left: Left, how: str, killed: bool) -> Escape:
    return Escape(info.pid, info.start, info.name, left, how, time.time(), killed)
