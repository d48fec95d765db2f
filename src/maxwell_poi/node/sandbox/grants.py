"""What a confined agent may see of the host's files: exactly what its program needs, found from its
command line and from where Maxwell keeps models, nothing from the node's own state.

- **read**: the Python running the node (its prefixes and every `sys.path` entry: the venv, the
  standard library, the package's source), the program `argv[0]` names, every existing path the
  command line names (`--key alice.pem`, a model folder, a store of answers), the local model
  folders the registry lists, the Hugging Face cache (read-only: the agent downloads nothing).
- **registry**: the agent gets its own $POI_HOME holding copies of the registry's user file and
  measured reference values (the node writes them mode 0600; the agent may add to its copy). Never
  the rest of the node's $POI_HOME (profiles, keyring, ledger, the node's key).
- **copies**: a file the command line names that the agent's uid could not read (`alice.pem`, mode
  0600, owned by root) is handed over as a private copy, owned by the agent's uid and mode 0400,
  shown at the same path; the original's permissions are never changed.
- **outputs**: a `--option` value that names a path not there yet and has no suffix
  (`--trace-dir traces/alice`, `--store DIR`), or an empty folder, is the agent's output folder:
  its uid's for the agent's life, its owner's again after (outputs.py).
- **sockets**: a Unix socket the command line names is shown at its path; whether the agent may
  connect is the socket's own permission (the relay adversary's worker opens its socket to all).
- **env**: HOME and TMPDIR move to the private directory, so where the node found the Hugging Face
  cache through HOME is pinned for the agent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...registry.home import poi_home

# variables that name folders an agent reads (where set): granted read-only
PATH_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "POI_TOKENIZER")
# options whose value is a whole command line the agent starts as its child (prover.engine_process)
NESTED_COMMANDS = frozenset({"--engine-cmd"})
# an option value taken as a path the agent may create: no spaces or shell syntax, one "/" at least
_CLEAN_PATH = re.compile(r"^[\w.~+@%=,-]*/[\w./~+@%=,-]*$")


@dataclass(frozen=True)
class Grants:
    """Paths are absolute and normalised; `env` holds the variables set for the agent."""

    read: tuple[Path, ...] = ()
    copies: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    registry_home: Path | None = None  # the node's $POI_HOME: its registry files are copied, not shown
    registry_files: tuple[Path, ...] = ()  # those files (models.json, reference/*.json)


def readable_by_others(path: Path) -> bool:
    """Whether a uid that neither owns `path` nor is in its group may read it (ACLs aside)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need


def _absolute(raw: str, cwd: Path) -> Path:
    return Path(os.path.normpath(cwd / os.path.expanduser(raw)))


def interpreter_paths() -> list[Path]:
    """The running Python: the agents the node starts are this interpreter with this package."""
    out = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    out.add(Path(os.path.realpath(sys.executable)).parent)
    out.update(Path(p) for p in sys.path if p and os.path.exists(p))
    out.add(Path(__file__).resolve().parents[3])  # the folder holding maxwell_poi (an editable install)
    return sorted(out)


def registry_files(home: Path) -> list[Path]:
    """The registry's user file and cached reference values: small, copied for the agent."""
    files = [home / "models.json", *sorted((home / "reference").glob("*.json"))]
    return [f for f in files if f.is_file()]


def local_model_folders(home: Path) -> list[Path]:
    """The folders of the local models the registry's user file lists."""
    try:
        models = json.loads((home / "models.json").read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return []
    specs = models.values() if isinstance(models, dict) else ()
    return [Path(m["path"]) for m in specs if isinstance(m, dict) and isinstance(m.get("path"), str)]


def hugging_face_home(env: Mapping[str, str]) -> Path:
    """Where huggingface_hub looks when HF_HOME is not set, as the node (not the agent) resolves it."""
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"])
    cache = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME", str(Path.home())), ".cache")
    return Path(os.path.expanduser(cache)) / "huggingface"


def command_line(argv: Sequence[str], cwd: Path) -> Grants:
    """What the arguments name: existing paths to read (copied when the agent could not read them),
    option values naming paths not there yet (or empty folders) to write."""
    read: list[Path] = []
    copies: list[Path] = []
    outputs: list[Path] = []
    previous = ""
    for arg in argv[1:]:
        _, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not eq and arg.startswith("-"):
            previous = arg
            continue
        is_option_value = bool(eq) or previous.startswith("--")
        nested = (arg.partition("=")[0] if eq else previous) in NESTED_COMMANDS
        previous = ""
        if not value or "\0" in value:
            continue
        if nested:  # `--engine-cmd "python -m llama_cpp.server --model x.gguf"`: what the child names
            inner = command_line(["engine", *shlex.split(value)], cwd)
            read += inner.read
            copies += inner.copies
            outputs += inner.outputs
            continue
        path = _absolute(value, cwd)
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None:  # a folder the agent will write (no suffix: a file or socket is not made)
            if is_option_value and _CLEAN_PATH.match(value) and not path.suffix and path.parent != path:
                outputs.append(path)
        elif stat.S_ISSOCK(info.st_mode):
            read.append(path)  # shown at its path; connecting needs write permission on it
        elif stat.S_ISREG(info.st_mode):
            (read if readable_by_others(path) else copies).append(path)
        elif stat.S_ISDIR(info.st_mode):
            empty = not any(path.iterdir()) if os.access(path, os.R_OK) else False
            (outputs if empty and is_option_value else read).append(path)
    return Grants(tuple(read), tuple(copies), tuple(outputs))


def agent_grants(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Grants:
    """Everything a Maxwell agent started as `argv` in `cwd` needs, and the variables it needs set."""
    home = Path(env["POI_HOME"]) if env.get("POI_HOME") else poi_home()
    hf_home = hugging_face_home(env)
    program = shutil.which(argv[0], path=env.get("PATH")) if argv else None
    read = [*interpreter_paths(), *local_model_folders(home), hf_home]
    if program:
        read += [Path(os.path.abspath(program)), Path(os.path.realpath(program))]
    read += [Path(env[v]) for v in PATH_VARIABLES if env.get(v)]
    named = command_line(argv, cwd)
    existing = [p for p in dict.fromkeys(_absolute(str(p), cwd) for p in [*read, *named.read]) if p.exists()]
    outermost = [p for p in existing if not any(q in p.parents for q in existing)]
    return Grants(
        read=tuple(outermost),
        copies=named.copies,
        outputs=named.outputs,
        env={"HF_HOME": str(hf_home)},
        registry_home=home,
        registry_files=tuple(registry_files(home)),
    )
