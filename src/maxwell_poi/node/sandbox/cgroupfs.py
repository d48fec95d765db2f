"""Finding cgroup hierarchies in /proc/self/mounts, and the few file operations both cgroup versions
share: creating a group, reading a counter fast, joining a group before exec, removing a group."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import SandboxUnavailable

PARENT = "maxwell-poi"  # every sandbox group lives under <mount>/maxwell-poi/<name>
MOUNTS = "/proc/self/mounts"


@dataclass(frozen=True)
class Mount:
    path: Path
    fstype: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    """Mount paths escape space, tab, newline and backslash as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_file() -> str:
    return MOUNTS


def read_mounts(path: str | None = None) -> list[Mount]:
    out = []
    try:
        with open(path or MOUNTS) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 4:
            out.append(Mount(Path(_unescape(parts[1])), parts[2], frozenset(parts[3].split(","))))
    return out


def cgroup2_mount(mounts: Sequence[Mount] | None = None) -> Path | None:
    for m in read_mounts() if mounts is None else mounts:
        if m.fstype == "cgroup2":
            return m.path
    return None


def cgroup1_mount(controller: str, mounts: Sequence[Mount] | None = None) -> Path | None:
    """The v1 hierarchy carrying `controller` (it may be co-mounted, e.g. `cpu,cpuacct`)."""
    for m in read_mounts() if mounts is None else mounts:
        if m.fstype == "cgroup" and controller in m.options:
            return m.path
    return None


def writable(path: Path) -> str | None:
    """None if we may create groups under `path` (or under its existing maxwell-poi child)."""
    target = path / PARENT if (path / PARENT).is_dir() else path
    if not os.access(target, os.W_OK):
        return f"{target} not writable"
    return None


def make_group(mount: Path, name: str) -> Path:
    """Create <mount>/maxwell-poi/<name>; a leftover maxwell-poi parent is reused."""
    parent = mount / PARENT
    try:
        parent.mkdir(exist_ok=True)
        group = parent / name
        group.mkdir()
    except OSError as e:
        raise SandboxUnavailable(f"cannot create cgroup under {parent}: {e.strerror or e}") from e
    return group


def open_counter(path: Path) -> int:
    """A read-only fd kept open for the sandbox's life: re-reading it costs one pread, not an open."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def pread_text(fd: int) -> bytes:
    # seq_file restarts at offset 0, so a pread(0) sees the current value every time.
    return os.pread(fd, 65536, 0)


def pread_int(fd: int) -> int:
    return int(pread_text(fd))


def read_procs(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_bytes().split()]
    except FileNotFoundError:
        return []


def joiner(groups: Sequence[Path]) -> tuple[Callable[[], None], list[int]]:
    """A preexec_fn that moves the forked child into `groups` before exec, and the fds it writes to.

    The files are opened in the parent so the child runs one os.write per group and nothing else
    (preexec_fn runs between fork and exec, where little Python is safe). Writing "0" moves the
    writer itself. A failure raises in the child and Popen reports it: the agent never runs unaccounted.
    """
    fds = [os.open(g / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for g in groups]

    def join() -> None:
        for fd in fds:
            os.write(fd, b"0")

    return join, fds


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_group(group: Path, timeout: float = 2.0) -> None:
    """rmdir `group`, retrying while the kernel finishes tearing down exited tasks."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def spawn_joined(
    groups: Sequence[Path], argv: list[str], env: dict[str, str], kw: dict[str, Any]
) -> subprocess.Popen[Any]:
    """Start `argv` already inside `groups`: the child joins them between fork and exec."""
    if "preexec_fn" in kw:
        raise ValueError("preexec_fn is taken: the sandbox uses it to join its cgroups before exec")
    join, fds = joiner(groups)
    try:
        return subprocess.Popen(argv, env=env, preexec_fn=join, **kw)
    finally:
        close_fds(fds)
