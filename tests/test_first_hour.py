"""The first hour, as a test (issue 23, item 7): docs/service.md's "Start it" and docs/gateway.md's
walk-through, read out of the markdown and run as printed, command by command, in one bash shell —
`poi serve` in the background, profile, keygen, enroll, deposit, bid, bids / leases / balance / EAR /
ledger, `poi ledger check`, a requester, an offer, and a chat completion with the official `openai`
client, streamed and not — on a host a neighbour process keeps loaded. Every command must succeed and
print what its `# →` lines say; every honest lease (all of them here: alice is honest) must end
affirming. The docs are the script, so they cannot drift from what works.

What the test sets, as the docs say a reader may: POI_HOME (a temporary directory), the working
directory (an empty one), POI_SERVE_PORT / POI_SERVER (a free port), PATH with this venv's bin first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from doc_walkthrough import Ran, SaveFile, Shell, Step, section, unmatched, walkthrough

from maxwell_poi.service.wire import LeaseView

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: `poi` and `python` are beside it
STEP_TIMEOUT_S = 300.0  # `poi profile` under a loaded host is the longest step
PENDING = {"issued", "pulled", "audit_pending"}


def doc_steps() -> list[Step | SaveFile]:
    service = walkthrough(section((ROOT / "docs/service.md").read_text(), "## Start it"))
    gateway = walkthrough((ROOT / "docs/gateway.md").read_text())
    return [*service, *gateway]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Neighbour:
    """Another tenant of the host: a process keeping one core busy; `pause` stops it (SIGSTOP),
    `resume` lets it run again (SIGCONT)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def reader(tmp_path: Path) -> Iterator[tuple[Shell, dict[str, str], Path]]:
    if not (BIN / "poi").exists():
        pytest.skip(f"no `poi` beside {sys.executable}: the docs' commands need the installed CLI")
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POI_")}
    env.update(
        POI_HOME=str(tmp_path / "home"),
        POI_SERVE_PORT=str(port),
        POI_SERVER=f"http://127.0.0.1:{port}",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",  # nothing may download: every model here is in the package or seeded
    )
    shell = Shell(work, env, tmp_path / "logs")
    try:
        yield shell, env, work
    finally:
        shell.close()


def leases_of_alice(env: dict[str, str], work: Path) -> list[LeaseView]:
    from maxwell_poi.protocol.keys import AgentKey
    from maxwell_poi.service import ServiceClient

    with ServiceClient(
        env["POI_SERVER"], key=AgentKey.load(work / "alice.pem"), principal="agent:alice"
    ) as c:
        return c.leases()


def settled_leases(env: dict[str, str], work: Path, timeout_s: float = 180.0) -> list[LeaseView]:
    """Alice's leases once none is still on its way (pulled, or waiting for a drawn audit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        leases = leases_of_alice(env, work)
        if not any(v.status in PENDING for v in leases) or time.monotonic() > deadline:
            return leases
        time.sleep(1.0)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(none)"


def state(env: dict[str, str], work: Path) -> str:
    """What a failed step left behind: alice's bids and leases (each with why), the server's log."""
    try:
        from maxwell_poi.protocol.keys import AgentKey
        from maxwell_poi.service import ServiceClient

        key = AgentKey.load(work / "alice.pem")
        with ServiceClient(env["POI_SERVER"], key=key, principal="agent:alice") as c:
            bids = "\n".join(f"  {b.bid_id} {b.model_id} {b.status}: {b.reason}" for b in c.bids())
            leases = verdicts(c.leases())
    except Exception as exc:  # no key yet, or no server: say so instead
        bids = leases = f"  (not read: {type(exc).__name__}: {exc})"
    return f"--- bids\n{bids}\n--- leases\n{leases}\n--- serve.log (tail)\n{tail(work / 'serve.log')}"


def verdicts(leases: list[LeaseView]) -> str:
    return "\n".join(
        f"  {v.lease_id} {v.lease['model_id']} {v.status} "
        + (
            f"{v.verdict.verdict} (final {v.verdict.final}): {v.verdict.reason}"
            if v.verdict
            else "no verdict"
        )
        for v in leases
    )


def test_the_docs_walkthrough_runs_as_printed_on_a_loaded_host(reader) -> None:
    shell, env, work = reader
    steps = doc_steps()
    assert any(isinstance(s, Step) and s.command.startswith("poi serve") for s in steps)
    assert any(isinstance(s, SaveFile) for s in steps), "docs/gateway.md's python snippet"
    # The load, and where the profiles sit in it: the neighbour is busy from before `poi serve` to
    # the end, and paused only while a `poi profile` measures. So each profile is what honest
    # serving looks like on this host without the neighbour, and every lease and completion then
    # runs beside a core kept busy: contention the profiles never saw, in the direction a host that
    # got busier after profiling shows. Honest work under contention only takes longer and costs
    # more CPU per token, never less, so L1's and L2's floors (fractions of the profile's honest
    # runs) still hold and the verdict must be affirming — not merely the `warning` that
    # verifier/conditions.py allows for a moderate miss under unseen contention. (Profiling under
    # the load and then running quiet is the other direction: there a miss of the floors is what
    # the fail-safe turns into a warning, by design, so "affirming" would not be the promise.)
    neighbour = Neighbour()
    ran: list[Ran] = []
    try:
        for step in steps:
            if isinstance(step, SaveFile):
                (work / step.name).write_text(step.text)
                continue
            profiling = step.command.startswith("poi profile")
            if profiling:
                neighbour.pause()
            try:
                done = shell.run(step.command, STEP_TIMEOUT_S)
            finally:
                if profiling:
                    neighbour.resume()
            ran.append(done)
            assert done.rc == 0, f"{done.shown()}\n{state(env, work)}"
            missing = unmatched(step.prints, done.stdout + "\n" + done.stderr)
            assert not missing, (
                f"documented output not printed: {missing}\n{done.shown()}\n{state(env, work)}"
            )
        leases = settled_leases(env, work)
    finally:
        neighbour.stop()
        print("\n".join(f"{r.seconds:6.1f} s  {r.command.splitlines()[0][:100]}" for r in ran))
    not_affirmed = [
        v for v in leases if v.status != "settled" or v.verdict is None or v.verdict.verdict != "affirming"
    ]
    assert not not_affirmed, f"honest leases not affirmed on a loaded host:\n{verdicts(not_affirmed)}"
    assert all(v.verdict.final and v.verdict.stake_outcome == "released" for v in leases), verdicts(leases)
    # one bid and two completions (streamed and not): three leases, no more (a retried request that
    # left a lease behind would be work nobody asked for)
    models = sorted(v.lease["model_id"] for v in leases)
    assert models == ["gpt2-micro", "poi-lm", "poi-lm"], verdicts(leases)


def test_a_documented_output_that_is_not_printed_is_caught() -> None:
    """The check above can fail: a `# →` line compares with what was printed, in order, `…` aside."""
    (step,) = [s for s in doc_steps() if isinstance(s, Step) and s.command.startswith("poi client deposit")]
    printed = '{\n  "transfer_id": 1,\n  "agent_id": "alice",\n  "wallet_micro": 1000000,\n}'
    assert step.prints and unmatched(step.prints, printed) == []
    assert unmatched(step.prints, printed.replace("1000000", "999")) == step.prints
    assert unmatched(["ledger ok: … accounts, … transfers"], "ledger ok: 5 accounts,\n 5 transfers") == []
    assert unmatched(["b", "a"], "a b") == ["a"]  # order counts
