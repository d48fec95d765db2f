"""The host's process table as the node needs it to find an agent's processes wherever they went:
parent, session, real uid and start time of every live process, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    session: int
    uid: int  # real uid: an unprivileged process cannot change it
    start: int  # clock ticks after boot; with the pid, one process's identity (pids are reused)
    name: str  # the kernel's comm: at most 15 characters, chosen by the process

    @property
    def identity(self) -> tuple[int, int]:
        return self.pid, self.start


def read_process(pid: int) -> ProcessInfo | None:
    """One process, or None once it is gone or a zombie (it runs nothing and holds no memory)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read(2048)
    except OSError:
        return None
    close = stat.rindex(b")")  # the name may hold spaces and parentheses
    fields = stat[close + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    at = status.find(b"\nUid:")
    uid = int(status[at + 5 :].split(None, 1)[0]) if at >= 0 else -1
    name = stat[stat.index(b"(") + 1 : close].decode("utf-8", "replace")
    return ProcessInfo(pid, int(fields[1]), int(fields[3]), uid, int(fields[19]), name)


def process_table() -> dict[int, ProcessInfo]:
    """Every live process on the host (a few milliseconds for a few hundred processes)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := read_process(int(entry))) is not None:
            table[info.pid] = info
    return table


def descendants(table: dict[int, ProcessInfo], root: int) -> set[int]:
    """`root` and every process below it in the parent links of `table` (empty if root is gone)."""
    if root not in table:
        return set()
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def uids_in_use() -> set[int]:
    return {info.uid for info in process_table().values()}


def carrying(marker: bytes) -> set[int]:
    """Processes whose environment holds `marker` (e.g. b"NAME=value"); root reads every one. A
    process can scrub its environment: a hint for teardown, never accounting."""
    needle = b"\0" + marker + b"\0"
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in b"\0" + f.read() + b"\0":
                    out.add(int(entry))
        except OSError:
            continue
    return out
