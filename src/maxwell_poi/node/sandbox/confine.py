"""Confinement: the agent runs as nobody in particular — a uid and gid of its own, no capabilities,
no network, no view of the node's files beyond what it needs — or the sandbox says why not.

A root node allocates each sandbox a fresh uid/gid from a high range (no /etc/passwd entry; no
supplementary groups) and a private directory, <tmp>/maxwell-poi-sandboxes/<name>: `tmp/` (the
agent's HOME and TMPDIR, its uid, mode 0700), `copies/` (files handed over), `poi-home/` (its
registry copy); output folders its command line names stay where they are, its own while it runs
(outputs.py). The agent's command is run through `launch.py`, which does the kernel's part in the child
(namespaces, masks and binds, privileges) and reports it on a pipe before exec. What the agent may
see is `grants.agent_grants`: read-only binds of what it needs under empty tmpfs masks over every
folder its uid could not pass (homes) and over the host's shared temp folders.

A node that is not root, a kernel that refuses namespaces, or POI_CONFINE=off leaves the agent
unconfined (today's behaviour: the node's uid, its files and network) and `describe()` says why.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .grants import Grants, agent_grants, readable_by_others
from .outputs import Handed, hand_over, last_holder, take_back
from .processes import uids_in_use

ENV_CONFINE = "POI_CONFINE"
UID_BASE = 2_000_000_000  # far above login and subordinate-uid ranges; no name needed
UID_SPAN = 1 << 24
PROBE_UID = UID_BASE - 1  # the probe drops to it in a throwaway process
MASKED_ALWAYS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # the host's world-writable folders
LAUNCHER = Path(__file__).with_name("launch.py")
LAUNCH_TIMEOUT_S = 60.0
NAMESPACES = ("mnt", "net", "ipc", "uts")

_taken: set[int] = set()
_taken_lock = threading.Lock()


def why_unconfined() -> str | None:
    """None when this node can confine agents, else why it cannot (or was told not to)."""
    raw = os.environ.get(ENV_CONFINE, "").strip().lower()
    euid = os.geteuid() if hasattr(os, "geteuid") else -1
    if raw in ("0", "off", "no", "false"):
        return (
            f"{ENV_CONFINE}={raw}: the operator turned confinement off; the agent runs as the node's "
            f"uid {euid}, sees the node's files and may use the network"
        )
    if not sys.platform.startswith("linux"):
        return f"confinement needs Linux namespaces; this is {sys.platform}"
    if euid != 0:
        return (
            f"the node runs as uid {euid}, not root: it cannot give the agent a uid or namespaces of "
            "its own; the agent runs as the node's user, sees that user's files and may use the network"
        )
    return kernel_refusal()


@functools.cache
def kernel_refusal() -> str | None:
    """Run the launcher's probe once per process: the same kernel calls on a throwaway child."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(LAUNCHER), "--probe", str(PROBE_UID)],
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT_S,
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return f"the confinement probe failed: {exc}"
    return None if answer.get("ok") else f"the kernel refused confinement: {answer.get('error')}"


def sandboxes_dir() -> Path:
    """Root-owned, mode 0711: agents may pass through to their own folder, not list the others."""
    path = Path(tempfile.gettempdir()) / "maxwell-poi-sandboxes"
    path.mkdir(mode=0o711, exist_ok=True)
    os.chmod(path, 0o711)
    return path


def allocate_uid() -> int:
    """A uid no live process holds and no other sandbox of this node took."""
    live = uids_in_use()
    with _taken_lock:
        for _ in range(1000):
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid not in _taken and uid not in live:
                _taken.add(uid)
                return uid
    raise RuntimeError(f"no free uid in [{UID_BASE}, {UID_BASE + UID_SPAN})")


def closed_to_strangers(folder: Path) -> bool:
    """Whether a uid that neither owns `folder` nor is in its group cannot pass through it (0700)."""
    return not folder.stat().st_mode & stat.S_IXOTH


def hidden_ancestor(path: Path) -> Path | None:
    """The outermost folder above `path` that a stranger's uid cannot pass through (a home, 0700)."""
    for parent in reversed(path.parents):
        if parent == parent.parent:
            continue  # "/" is never masked
        try:
            if closed_to_strangers(parent):
                return parent
        except OSError:
            return None
    return None


def _under(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _owned(path: Path, uid: int, mode: int) -> Path:
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


class Confinement:
    """One sandbox's confinement, or the reason there is none.

    `wrap` turns the agent's command into the launcher's (or, unconfined, starts it in a session of
    its own); `started` reads the launcher's report and fails the spawn if any step failed;
    `release` takes the output folders back and removes the private directory, once nothing runs.
    """

    def __init__(self, name: str, agent: str) -> None:
        self.name = name
        self.agent = agent  # the name it runs as: a restart gets its output folders back
        self.reason = why_unconfined()
        self.uid: int | None = allocate_uid() if self.reason is None else None
        self.root_dir: Path | None = sandboxes_dir() / name if self.reason is None else None
        self.grants = Grants()
        self.masked: list[Path] = []
        self.unreadable: list[Path] = []
        self.report: dict[str, Any] = {}
        self._handed: list[Handed] = []  # output folders given to the agent's uid
        self._status: tuple[int, int] | None = None  # the launcher's report pipe (read, write)

    @property
    def confined(self) -> bool:
        return self.reason is None

    @property
    def private_tmp(self) -> Path | None:
        return None if self.root_dir is None else self.root_dir / "tmp"

    # -- spawning --------------------------------------------------------------------------------
    def wrap(
        self, argv: list[str], env: dict[str, str], kw: dict[str, Any]
    ) -> tuple[list[str], dict[str, str], dict[str, Any]]:
        if self.uid is None or self.root_dir is None:
            return argv, env, {**kw, "start_new_session": True}  # the session finds stragglers
        if kw.get("start_new_session") or kw.get("user") or kw.get("group") or kw.get("extra_groups"):
            raise ValueError("a confined sandbox sets the agent's session, uid and groups itself")
        cwd = Path(os.path.abspath(kw.get("cwd") or os.getcwd()))
        grants = agent_grants(argv, cwd, env)
        again = tuple(p for p in grants.read if last_holder(p) == self.agent)  # a restart's outputs
        read = tuple(p for p in grants.read if p not in again)
        self.grants = replace(grants, read=read, outputs=(*grants.outputs, *again))
        steps = self._file_steps(cwd)
        report_r, report_w = os.pipe()
        self._status = (report_r, report_w)
        spec = {"uid": self.uid, "gid": self.uid, "status_fd": report_w, "steps": steps, "cwd": str(cwd)}
        tmp = str(self.private_tmp)
        env = {
            **env,
            **self.grants.env,
            "POI_HOME": str(self.root_dir / "poi-home"),
            **dict.fromkeys(("HOME", "TMPDIR", "TMP", "TEMP"), tmp),
            "XDG_CACHE_HOME": f"{tmp}/.cache",
            "XDG_CONFIG_HOME": f"{tmp}/.config",
            "USER": f"poi-agent-{self.uid}",
            "LOGNAME": f"poi-agent-{self.uid}",
        }
        kw = {**kw, "pass_fds": (*kw.get("pass_fds", ()), report_w)}
        return [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec), *argv], env, kw

    def _file_steps(self, cwd: Path) -> list[dict[str, Any]]:
        """The private directory, the copies, the output folders handed over; the launcher's masks
        and binds, outer before inner."""
        assert self.uid is not None and self.root_dir is not None
        uid, root = self.uid, self.root_dir
        root.mkdir(mode=0o711)
        (root / "tmp").mkdir()
        tmp = _owned(root / "tmp", uid, 0o700)
        binds: list[tuple[Path, Path, bool]] = [(tmp, tmp, True)]
        (root / "copies").mkdir(mode=0o711)
        for i, original in enumerate(self.grants.copies):
            copy = root / "copies" / f"{i}-{original.name}"
            shutil.copyfile(original, copy)
            binds.append((_owned(copy, uid, 0o400), original, False))
        home = self._registry_copy(root / "poi-home")
        for folder in self.grants.outputs:
            self._handed.append(hand_over(folder, uid))
            binds.append((folder, folder, True))
        binds.append((home, home, True))
        targets = [t for _, t, _ in binds] + list(self.grants.read) + [cwd]
        masks = {Path(m) for m in MASKED_ALWAYS if os.path.isdir(m)}
        masks.update(a for t in targets if (a := hidden_ancestor(t)) is not None)
        node_home = self.grants.registry_home
        if node_home is not None and node_home.is_dir() and node_home != node_home.parent:
            masks.add(node_home)  # the node's state (profiles, keyring, ledger, keys): never shown
        # a folder to show that a stranger cannot pass through (the node's cwd under pytest's 0700
        # tmp, which `python -m` puts on sys.path) would, bound as it is, hide every copy and
        # output bound under it: it is masked instead, and the agent could not read it anyway
        closed = [p for p in self.grants.read if p.is_dir() and closed_to_strangers(p)]
        masks.update(closed)
        self.masked = sorted(masks)
        reads = [p for p in self.grants.read if _under(p, self.masked) and p not in closed]
        reads = [p for p in reads if not _under(p.parent, reads)]  # one bind shows what lies inside
        binds += [(p, p, False) for p in reads]
        self.unreadable = [p for p in self.grants.read if not readable_by_others(p)]
        steps = [(len(m.parts), 0, {"mask": str(m), "mode": "1777" if str(m) in MASKED_ALWAYS else "0755"})
                 for m in self.masked]  # fmt: skip
        steps += [(len(t.parts), 1, {"bind": str(s), "at": str(t), "writable": w}) for s, t, w in binds]
        return [step for *_, step in sorted(steps, key=lambda s: (s[0], s[1]))]

    def _registry_copy(self, home: Path) -> Path:
        """The agent's own $POI_HOME: copies of the registry's files, its uid's to read and add to."""
        assert self.uid is not None
        node_home = self.grants.registry_home
        (home / "reference").mkdir(parents=True)
        for original in self.grants.registry_files:
            assert node_home is not None
            copy = home / original.relative_to(node_home)
            shutil.copyfile(original, copy)
            _owned(copy, self.uid, 0o600)
        _owned(home / "reference", self.uid, 0o700)
        return _owned(home, self.uid, 0o700)

    def started(self, proc: subprocess.Popen[Any] | None) -> None:
        """After Popen: wait for the launcher's report (end of file: it exec'd the agent); raise, with
        the launcher killed, if any confinement step failed. Called with None when Popen failed."""
        if self._status is None:
            return
        report_r, report_w = self._status
        self._status = None
        os.close(report_w)
        try:
            if proc is None:
                return
            reports = [json.loads(line) for line in self._read_report(report_r).splitlines() if line.strip()]
            failed = [r["error"] for r in reports if "error" in r]
            if failed or not reports:
                why = "; ".join(failed) or "the launcher exited before confining"
                raise RuntimeError(f"sandbox {self.name}: confining the agent failed: {why}")
            self.report = reports[0]
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        finally:
            os.close(report_r)

    @staticmethod
    def _read_report(fd: int) -> str:
        data, deadline = b"", time.monotonic() + LAUNCH_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break
            block = os.read(fd, 65536)
            if not block:
                return data.decode()
            data += block
        raise RuntimeError(f"the launcher did not exec the agent within {LAUNCH_TIMEOUT_S:.0f} s")

    # -- teardown --------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove what this sandbox made on the host; call once none of its processes runs."""
        for handed in self._handed:
            assert self.uid is not None
            take_back(handed, self.uid, self.agent)
        self._handed = []
        if self.root_dir is not None:
            shutil.rmtree(self.root_dir, ignore_errors=True)
        if self.uid is not None:
            with _taken_lock:
                _taken.discard(self.uid)

    def describe(self) -> dict[str, Any]:
        if not self.confined:
            return {"confined": False, "reason": self.reason}
        return {
            "confined": True,
            "uid": self.uid,
            "gid": self.uid,
            "namespaces": list(NAMESPACES),
            "proc": "hidepid=2",
            "private_tmp": str(self.private_tmp),
            "masked": [str(p) for p in self.masked],
            "read_only": [str(p) for p in self.grants.read],
            "copies": [str(p) for p in self.grants.copies],
            "registry_copied": [str(p) for p in self.grants.registry_files],
            "outputs": [str(p) for p in self.grants.outputs],
            "unreadable": [str(p) for p in self.unreadable],
            "capabilities": {k: v for k, v in self.report.items() if k.startswith("Cap")},
        }
