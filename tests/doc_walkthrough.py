"""Reading a doc's walk-through out of its markdown, and running it the way a reader would: one bash
shell, command after command, each one's output kept and held against the `# → …` lines the doc
prints beneath it (`tests/test_first_hour.py`).

A fenced ```bash block is a list of steps: a line that is not a comment starts a command (a line
ending in `\\` goes on to the next one); a `# → TEXT` line below it is part of what that command
prints, `…` standing for whatever differs from run to run; any other comment is prose. A ```python
block is a file the doc asks the reader to save ("save this as `chat.py`")."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SAVE_AS = re.compile(r"save this as `([^`]+)`[^`]*$", re.IGNORECASE)
PRINTS = "# →"


@dataclass
class Step:
    command: str
    prints: list[str] = field(default_factory=list)


@dataclass
class SaveFile:
    name: str
    text: str


def section(markdown: str, heading: str) -> str:
    """The text under `heading` (a `## …` line), up to the next heading of that level."""
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find("\n## ", start + len(heading) + 2)
    return markdown[start : end if end >= 0 else len(markdown)]


def walkthrough(markdown: str) -> list[Step | SaveFile]:
    """The bash steps and the files to save, in the doc's order."""
    items: list[Step | SaveFile] = []
    for fence in FENCE.finditer(markdown):
        lang, body = fence.group(1), fence.group(2)
        if lang == "bash":
            items.extend(bash_steps(body))
        elif lang == "python":
            said = SAVE_AS.search(markdown[: fence.start()].rstrip()[-200:])
            if said is None:
                raise ValueError(f"a python block with no 'save this as `NAME`' before it:\n{body[:200]}")
            items.append(SaveFile(said.group(1), body))
    return items


def bash_steps(block: str) -> list[Step]:
    steps: list[Step] = []
    continued = False
    for line in block.splitlines():
        text = line.strip()
        if continued:
            steps[-1].command += "\n" + line
        elif text.startswith(PRINTS):
            if not steps:
                raise ValueError(f"{line!r} documents the output of no command")
            steps[-1].prints.append(text[len(PRINTS) :].strip())
        elif text and not text.startswith("#"):
            steps.append(Step(line))
        continued = bool(text) and not text.startswith("#") and text.endswith("\\")
    return steps


def printed_pattern(documented: str) -> re.Pattern[str]:
    """A documented output line as a pattern: literal text, `…` for anything, any run of
    whitespace for any other (rich wraps long lines where a terminal is narrow)."""
    parts = [r"\s+".join(re.escape(w) for w in piece.split()) for piece in documented.split("…")]
    return re.compile(".*?".join(parts), re.DOTALL)


def unmatched(prints: list[str], output: str) -> list[str]:
    """The documented lines the output does not show, in the doc's order (each looked for after the
    previous one's match)."""
    missing, at = [], 0
    for documented in prints:
        found = printed_pattern(documented).search(output, at)
        if found is None:
            missing.append(documented)
        else:
            at = found.end()
    return missing


@dataclass
class Ran:
    command: str
    rc: int | None  # None: still running when its time ran out
    stdout: str
    stderr: str
    seconds: float

    def shown(self, limit: int = 3000) -> str:
        return (
            f"$ {self.command}\n(rc {self.rc}, {self.seconds:.1f} s)\n--- stdout\n{self.stdout[-limit:]}"
            f"\n--- stderr\n{self.stderr[-limit:]}"
        )


class Shell:
    """One bash process the commands are typed into, one at a time, as in a terminal: variables,
    `export`s and background jobs carry from one command to the next. Each command's stdout, stderr
    and exit status go to files in `logs`."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc = subprocess.Popen(
            ["bash"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=(logs / "shell.err").open("w"),
            cwd=cwd,
            env=env,
            text=True,
            start_new_session=True,
        )

    def run(self, command: str, timeout_s: float) -> Ran:
        self.count += 1
        out, err, rc = (self.logs / f"{self.count}.{ext}" for ext in ("out", "err", "rc"))
        assert self.proc.stdin is not None
        # stdin from /dev/null: a command must not read the commands typed after it
        self.proc.stdin.write(
            f"{{\n{command}\n}} > {out} 2> {err} < /dev/null\necho $? > {rc}.part && mv {rc}.part {rc}\n"
        )
        self.proc.stdin.flush()
        start = time.monotonic()
        while not rc.exists() and time.monotonic() - start < timeout_s and self.proc.poll() is None:
            time.sleep(0.2)
        seconds = time.monotonic() - start
        code = int(rc.read_text()) if rc.exists() else None
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return Ran(command, code, read(out), read(err), seconds)

    def close(self, grace_s: float = 30.0) -> None:
        """End what the commands left running (the background `poi serve`, its agents) and the shell:
        SIGTERM to each by id, SIGKILL to whatever outlives the grace period."""
        import psutil

        try:
            left = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            left = []
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(left, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
