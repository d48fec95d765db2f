"""Output folders: a folder the agent's command line names for it to write (`--trace-dir
traces/alice`, an adversary's `--store`) is the agent's for its life and its owner's again after.

At spawn the node creates the folder if it is not there, and gives it, and what lies in it, to the
sandbox's uid (mode 0700). At close, once nothing of the agent runs, everything in it that uid owns
goes back to the folder's owner before, and the folder gets its mode back: traces stay where the
operator named them, owned by the node. An agent started again under the same name (a restart, by
this node process or a later one) gets its folder again, traces included, so it can still open a
lease it answered before: the node writes whose folder it was into MARKER at close, over whatever
the agent left there.

Ownership moves only along what the agent made: at close only entries its uid owns are given back
(a hard link to someone else's file keeps its owner; the kernel refuses such links anyway with
fs.protected_hardlinks), and at a hand-over a file with more than one link is left as it is.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MARKER = ".maxwell-poi-output"  # {"agent": name}: written by the node when it takes a folder back
_last_holder: dict[Path, str] = {}  # folder -> the agent name it was last handed to, in this process
_lock = threading.Lock()


@dataclass(frozen=True)
class Handed:
    """A folder given to an agent, and who owned it before (to give it back)."""

    path: Path
    uid: int
    gid: int
    mode: int


def last_holder(path: Path) -> str | None:
    """The agent the node last handed `path` to, if it did (this process, else the folder's marker)."""
    with _lock:
        if path in _last_holder:
            return _last_holder[path]
    marker = path / MARKER
    try:
        if marker.lstat().st_uid != os.geteuid():
            return None  # not the node's writing
        agent = json.loads(marker.read_text()).get("agent")
    except (OSError, ValueError, AttributeError):
        return None
    return agent if isinstance(agent, str) else None


def _mark(path: Path, agent: str) -> None:
    marker = path / MARKER
    marker.unlink(missing_ok=True)  # whatever the agent left there (a link, a forgery) goes
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"agent": agent}, f)


def _entries(top: Path) -> Iterator[str]:
    """`top` and everything below it, symlinks not followed."""
    yield str(top)
    for folder, dirs, files in os.walk(top, followlinks=False):
        for name in (*dirs, *files):
            yield os.path.join(folder, name)


def hand_over(path: Path, uid: int) -> Handed:
    """Create `path` if missing (its parents as the node's, 0755); give it and its contents to `uid`."""
    path.mkdir(parents=True, exist_ok=True)
    before = path.stat()
    for entry in _entries(path):
        info = os.lstat(entry)
        if stat.S_ISDIR(info.st_mode) or info.st_nlink == 1:
            os.lchown(entry, uid, uid)
    os.chmod(path, 0o700)
    return Handed(path, before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))


def take_back(handed: Handed, uid: int, agent: str) -> None:
    """Give what `uid` owns in the folder to its owner before; call once nothing of `uid` runs."""
    if not handed.path.is_dir():
        return
    for entry in _entries(handed.path):
        if os.lstat(entry).st_uid == uid:
            os.lchown(entry, handed.uid, handed.gid)
    os.chmod(handed.path, handed.mode)
    _mark(handed.path, agent)
    with _lock:
        _last_holder[handed.path] = agent
