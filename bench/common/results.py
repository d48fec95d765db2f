"""The one writer of bench/results/*.json: each key it writes is stamped with the run that wrote it.

Every benchmark declares, at module top, the results keys it writes:

    WRITES = {"core.json": ["generation", "receipt", ...]}     # fnmatch patterns allowed: "ezkl_*_s"

and writes them only through `write_result(file, key, value, writes=WRITES)` (or `write_results` for
several keys under one lock). A key the script did not declare is refused, so the declaration is what
the script writes; tests/test_bench_results.py reads the declarations (statically) and fails when a
committed key has no writer, or two scripts claim one key.

Each write merges into the file under an exclusive fcntl lock on its folder (several benchmarks share
service.json and gateway.json; the lock keeps one from clobbering another's keys), replaces the file
atomically (a crash leaves the old file or the new one, never half of one), and records under the
provenance key `_meta` which command, commit, host and time wrote that key. The values stay where
they were, so readers (the report) are unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "bench" / "results"
META = "_meta"
PROVENANCE_KEYS = frozenset({META})  # top-level keys that record who wrote the others, not results


def commit() -> str:
    """The commit measured: POI_COMMIT if set (a copy without .git), else `git rev-parse HEAD`
    (with "-dirty" when tracked files differ from it), else "unknown"."""
    if env := os.environ.get("POI_COMMIT"):
        return env
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "src", "bench"], cwd=ROOT, timeout=30
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def command() -> str:
    """This process's command line as typed: `python -m bench.x.y ARGS` for a module run."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    argv = ["python", "-m", spec.name, *sys.argv[1:]] if spec and spec.name else ["python", *sys.argv]
    return shlex.join(argv)


def stamp() -> dict[str, Any]:
    """Who wrote a key: the command line, the commit, the host (name, CPUs, load) and the time."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "command": command(),
        "commit": commit(),
        "host": {"name": socket.gethostname(), "cpus": os.cpu_count(), "load_avg": load},
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def declared(writes: Mapping[str, Collection[str]], file: str, key: str) -> bool:
    """Whether `writes` (a script's WRITES) declares `key` of `file` (exactly or by an fnmatch pattern)."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in writes.get(file, ()))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself: every writer of any file in it waits its turn, and no
    lock file is left behind."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def render(data: Mapping[str, Any], rows: Collection[str] = ()) -> str:
    """JSON with indent 2, except that each list under a key in `rows` has one compact item per line."""
    shown, lists = dict(data), {}
    for key in rows:
        if isinstance(shown.get(key), list):
            token = f"@@rows of {key}@@"
            items = ",\n".join(f"    {json.dumps(r, default=str)}" for r in shown[key])
            lists[json.dumps(token)] = f"[\n{items}\n  ]"
            shown[key] = token
    text = json.dumps(shown, indent=2, default=str)
    for token, block in lists.items():
        text = text.replace(token, block, 1)
    json.loads(text)  # never leave a file that does not parse
    return text


def write_results(
    file: str,
    values: Mapping[str, Any],
    *,
    writes: Mapping[str, Collection[str]],
    path: Path | None = None,
    deep: Collection[str] = (),
    rows: Collection[str] = (),
) -> Path:
    """Merge `values` (top-level key -> value) into bench/results/`file` (or `path`, e.g. a --quick
    run's /tmp file), stamping each key under `_meta`. Keys in `deep` are dicts merged one level down
    ({"sqlite": ...} leaves "postgresql" as it was); keys in `rows` are lists written one item per line
    (reliability.json's thousands of trial rows stay readable). Returns the path written."""
    undeclared = [k for k in values if k in PROVENANCE_KEYS or not declared(writes, file, k)]
    if undeclared:
        raise ValueError(
            f"{file}: keys not declared in this script's WRITES: expected one of "
            f"{sorted(writes.get(file, ()))}, got {undeclared}"
        )
    target = path or RESULTS_DIR / file
    target.parent.mkdir(parents=True, exist_ok=True)
    mark = stamp()
    with _locked(target.parent):
        current: dict[str, Any] = json.loads(target.read_text()) if target.exists() else {}
        for key, value in values.items():
            old = current.get(key)
            current[key] = {**old, **value} if key in deep and isinstance(old, dict) else value
        meta = current.pop(META, {})
        current[META] = {**meta, **{key: mark for key in values}}
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(render(current, rows) + "\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return target


def write_result(
    file: str, key: str, value: Any, *, writes: Mapping[str, Collection[str]], path: Path | None = None
) -> Path:
    """Merge one key into bench/results/`file` (see write_results)."""
    return write_results(file, {key: value}, writes=writes, path=path)
