"""Agents are unprivileged in their sandbox, and the node finds and ends every process of theirs
however it left (issue 24, item 1).

The reproduction — a child writes its pid into the cgroup root's cgroup.procs — is refused when the
agent is confined, and caught (killed on sight, reported) when it is not; a double-forked setsid
child and one re-parented to init are reported and killed at close; an escape marks the lease in
flight contraindicated (L1), an honest resident agent is never flagged. A confined agent has its own
uid, no capabilities, no network, a private temp folder and sees only the files it needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maxwell_poi.node.resident import ResidentAgent
from maxwell_poi.node.resident_runs import generate_leases, honest_resident, serve_wave
from maxwell_poi.node.sandbox import AccountingSource, Sandbox, available_sources, open_sandbox, outputs
from maxwell_poi.node.sandbox.base import pid_gone
from maxwell_poi.node.sandbox.confine import why_unconfined
from maxwell_poi.node.sandbox.escapes import Left
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import Status
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.verifier.appraisal import Appraisal
from maxwell_poi.verifier.containment import escape_attempts
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer

UNCONFINED = why_unconfined()
confined_only = pytest.mark.skipif(UNCONFINED is not None, reason=f"no confinement here: {UNCONFINED}")
SOURCES = [s for s, why in available_sources().items() if why is None and s is not AccountingSource.CGROUP_V2]
CGROUP_SOURCES = [s for s in SOURCES if s is not AccountingSource.PROC]

# Issue 24's reproduction, reporting the escaper's pid on stdout: `sleep` writes itself into the root
# group of every hierarchy the sandbox uses, then the shell waits.
REPRO = 'sleep 120 & for f in {procs}; do echo $! > "$f"; done; echo $!; sleep 60'
# The root forks an intermediate that (with setsid) forks the escaper and exits: the escaper is
# re-parented to init. It reports its pid and sleeps; the root idles.
DOUBLE_FORK = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    if {setsid}:
        os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.write(w, b"%d\\n" % os.getpid())
    time.sleep(120)
    os._exit(0)
os.wait()
print(os.read(r, 64).decode().strip(), flush=True)
time.sleep(60)
"""


def cgroup_roots(sb: Sandbox, *only: str) -> list[Path]:
    """<mount>/cgroup.procs of each hierarchy the sandbox's groups live in (<mount>/maxwell-poi/<name>),
    or of those named in `only` (describe()'s path keys: cpuacct, memory for v1; cgroup for v2)."""
    paths = sb.describe()["paths"]
    return sorted({Path(p).parent.parent / "cgroup.procs" for k, p in paths.items() if not only or k in only})


def first_line_pid(proc: subprocess.Popen) -> int:
    assert proc.stdout is not None
    return int(proc.stdout.readline())


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid_gone(pid)


@confined_only
@pytest.mark.parametrize("source", CGROUP_SOURCES, ids=str)
def test_the_cgroup_write_is_refused_for_a_confined_agent(source: AccountingSource) -> None:
    sb = open_sandbox("repro", prefer=source)
    try:
        procs = " ".join(str(p) for p in cgroup_roots(sb))
        root = sb.spawn(
            ["sh", "-c", REPRO.format(procs=procs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        pid = first_line_pid(root)
        assert pid in sb.pids()  # still charged to the sandbox: the write was refused
        assert sb.check_escapes() == ()
    finally:
        sb.close()
    assert wait_gone(pid), "close() left the sleep running"
    assert root.stderr is not None and b"Permission denied" in root.stderr.read()


@pytest.mark.parametrize("source", CGROUP_SOURCES, ids=str)
def test_an_agent_that_keeps_forking_is_never_taken_for_an_escaper(source: AccountingSource) -> None:
    # CI caught the reproduction's shell forking its `sleep 60` between the node's reading of the
    # cgroup's members and its scan of /proc: a child in neither reading's view was "outside the
    # cgroup" and killed. A child forked mid-check is seen at the next check, never an escape.
    sb = open_sandbox("forker", prefer=source)
    try:
        sb.spawn(["sh", "-c", "while :; do /bin/true & wait; done"])
        time.sleep(0.2)
        assert [sb.check_escapes() for _ in range(300)][-1] == ()
    finally:
        sb.close()


@pytest.mark.skipif(os.geteuid() != 0 or not CGROUP_SOURCES, reason="needs root and a cgroup source")
@pytest.mark.parametrize("source", CGROUP_SOURCES, ids=str)
@pytest.mark.parametrize("every", [True, False], ids=["every-hierarchy", "cpu-accounting-only"])
def test_an_unconfined_agent_that_leaves_the_cgroup_is_killed_on_sight_and_reported(
    source: AccountingSource, every: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POI_CONFINE", "off")  # today's root agent: the write succeeds
    sb = open_sandbox("repro", prefer=source)
    try:
        assert sb.describe()["confinement"] == {"confined": False, "reason": why_unconfined()}
        # leaving only the CPU-accounting group (v1 keeps memory elsewhere) is leaving too
        roots = cgroup_roots(sb) if every else cgroup_roots(sb, "cpuacct", "cgroup")
        procs = " ".join(str(p) for p in roots)
        root = sb.spawn(["sh", "-c", REPRO.format(procs=procs)], stdout=subprocess.PIPE)
        pid = first_line_pid(root)
        assert pid not in sb.held()  # it left: the cgroup no longer charges it (for CPU at least)
        (found,) = [e for e in sb.check_escapes() if e.pid == pid]
        assert found.left is Left.CGROUP and found.killed
        assert "session" in found.recognised_by or "ancestry" in found.recognised_by
        assert wait_gone(pid), "an escaper found outside the cgroup must be killed at once"
    finally:
        sb.close()
    # the name is the child's (sh until it execs sleep)
    reasons = sb.describe()["escapes"]
    assert any(r.startswith(f"pid {pid} (") and "left the sandbox's cgroup" in r for r in reasons), reasons


@pytest.mark.parametrize("source", SOURCES, ids=str)
@pytest.mark.parametrize("setsid", [True, False], ids=["double-fork-setsid", "reparented-to-init"])
def test_a_process_that_leaves_the_tree_is_reported_and_killed_at_close(
    source: AccountingSource, setsid: bool
) -> None:
    sb = open_sandbox("double-fork", prefer=source)
    try:
        root = sb.spawn([sys.executable, "-c", DOUBLE_FORK.format(setsid=setsid)], stdout=subprocess.PIPE)
        pid = first_line_pid(root)
        (found,) = [e for e in sb.check_escapes() if e.pid == pid]
        assert found.left is (Left.SESSION if setsid else Left.TREE), found.reason
        assert not found.killed and not pid_gone(pid)  # still held: ended at close, not on sight
    finally:
        sb.close()
    assert wait_gone(pid), "close() left the escaped process running"
    assert any(r.startswith(f"pid {pid} ") for r in sb.describe()["escapes"])


PROBE_SELF = """
import json, os, socket, sys
def attempt(f):
    try:
        return f()
    except OSError as e:
        return type(e).__name__
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
home = os.environ["HOME"]
with open(os.path.join(os.environ["TMPDIR"], "written"), "w") as f:
    f.write("x")
os.makedirs(sys.argv[3], exist_ok=True)
open(os.path.join(sys.argv[3], "trace"), "w").write("t")
def tcp():
    with socket.create_connection(("127.0.0.1", int(os.environ["HOST_PORT"])), timeout=2):
        return "connected"
def unix(addr):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(addr)
        return "connected"
print(json.dumps({
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "home": home, "tmpdir": os.environ["TMPDIR"],
    "home_stat": [os.stat(home).st_uid, os.stat(home).st_mode & 0o777],
    "key": attempt(lambda: open(sys.argv[1]).read()),
    "other_key": attempt(lambda: open(os.environ["OTHER_KEY"]).read()),
    "profiles": os.path.exists(os.path.join(os.environ["POI_HOME"], "profiles.json")),
    "interfaces": [n for _, n in socket.if_nameindex()],
    "tcp": attempt(tcp), "unix": attempt(lambda: unix(os.environ["HOST_SOCK"])),
    "abstract": attempt(lambda: unix("\\0" + os.environ["HOST_ABSTRACT"])),
    "host_pids": sum(e.isdigit() for e in os.listdir("/proc")),
}), flush=True)
"""


@confined_only
def test_a_confined_agent_is_unprivileged_offline_and_sees_only_what_it_needs(tmp_path: Path) -> None:
    key, other = tmp_path / "agent.pem", tmp_path / "other.pem"
    for path in (key, other):
        path.write_text(f"secret of {path.name}")
        path.chmod(0o600)
    (Path(os.environ["POI_HOME"]) / "profiles.json").write_text("{}")  # the node's: never shown
    host_tcp = socket.create_server(("127.0.0.1", 0))
    host_unix = socket.socket(socket.AF_UNIX)
    host_unix.bind(str(tmp_path / "host.sock"))
    os.chmod(tmp_path / "host.sock", 0o666)  # anyone may connect, if they can see it
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0poi-test-{os.getpid()}")
    for s in (host_unix, abstract):
        s.listen()
    scratch = tmp_path / "out" / "traces"
    argv = [sys.executable, "-c", PROBE_SELF, str(key), "--trace-dir", str(scratch)]
    # what it must not reach goes in the environment: a path on the command line would be shown to it
    env = {
        **os.environ,
        "HOST_PORT": str(host_tcp.getsockname()[1]),
        "HOST_SOCK": str(tmp_path / "host.sock"),
    }
    env.update(HOST_ABSTRACT=f"poi-test-{os.getpid()}", OTHER_KEY=str(other))
    with open_sandbox("confined") as sb:
        proc = sb.spawn(argv, env=env, stdout=subprocess.PIPE, cwd=tmp_path)
        assert proc.stdout is not None
        seen = json.loads(proc.stdout.readline())
        assert sb.wait(timeout=30) == 0
        desc = sb.describe()["confinement"]
    for s in (host_tcp, host_unix, abstract):
        s.close()
    uid = desc["uid"]
    assert seen["ids"] == [uid, uid, uid, []] and uid >= 2_000_000_000
    assert seen["cap_eff"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert seen["home"] == seen["tmpdir"] == desc["private_tmp"]
    assert seen["home_stat"] == [uid, 0o700]
    assert seen["key"] == "secret of agent.pem"  # named on its command line: a private copy
    assert seen["other_key"] == "FileNotFoundError"  # not named: /tmp is the agent's own
    assert key.stat().st_mode & 0o777 == 0o600  # the original is untouched
    assert seen["profiles"] is False
    assert seen["interfaces"] == ["lo"]
    assert seen["tcp"] in ("OSError", "ConnectionRefusedError", "TimeoutError")
    assert seen["unix"] == "FileNotFoundError" and seen["abstract"] == "ConnectionRefusedError"
    assert seen["host_pids"] <= 3  # hidepid: only its own processes
    assert not Path(desc["private_tmp"]).exists(), "the private folder outlived the sandbox"
    # its output folder stays where its command line named it, the node's again
    assert desc["outputs"] == [str(scratch)] and (scratch / "trace").read_text() == "t"
    assert {p.stat().st_uid for p in (scratch, scratch / "trace")} == {os.getuid()}


@confined_only
def test_a_closed_folder_on_the_nodes_path_does_not_hide_what_is_granted_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m` puts the node's cwd on sys.path, so it is shown to the agent; under pytest's
    tmp (0700) that folder, bound as it was, hid the key copy and output folder bound inside it
    (`poi demo --out` there: every agent failed 'Permission denied' on its key)."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    key = closed / "keys" / "agent.pem"
    key.parent.mkdir()
    key.write_text("secret of agent.pem")
    key.chmod(0o600)
    scratch = closed / "out" / "traces"
    monkeypatch.syspath_prepend(str(closed))
    script = (
        "import sys, pathlib; print(open(sys.argv[1]).read()); pathlib.Path(sys.argv[3], 't').write_text('t')"
    )
    with open_sandbox("closed-path") as sb:
        proc = sb.spawn(
            [sys.executable, "-c", script, str(key), "--trace-dir", str(scratch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=closed,
        )
        out, err = proc.communicate(timeout=30)
        desc = sb.describe()["confinement"]
    assert proc.returncode == 0, err.decode()[-1000:]
    assert out.decode().strip() == "secret of agent.pem"
    assert str(closed) in desc["masked"]  # masked (empty to the agent), not shown as it is
    assert (scratch / "t").read_text() == "t"


def test_a_node_that_is_not_root_says_why_the_agent_is_not_confined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POI_CONFINE", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with open_sandbox("not-root", prefer=AccountingSource.PROC) as sb:
        got = sb.describe()["confinement"]
    assert got["confined"] is False
    assert got["reason"].startswith("the node runs as uid 1000, not root")


# A resident agent with no model: it refuses every lease, and on the lease numbered by argv[1] it
# first starts a double-forked setsid child (the moonlighter's move), so that lease is in flight.
FAKE_AGENT = """
import json, os, sys, time
escape_on = int(sys.argv[1])
for n, line in enumerate(sys.stdin, 1):
    lease = json.loads(line)["lease_id"]
    if n == escape_on:
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
        os.wait()  # the intermediate is gone: the escaper runs, re-parented, before the answer
    sys.stdout.write(json.dumps({"x": lease, "error": "no model"}, separators=(",", ":")) + "\\n")
    sys.stdout.flush()
"""


def test_an_escape_marks_the_lease_in_flight_and_every_later_one(registry) -> None:
    leases = [
        Lease.issue("fake", "gpt2-micro", GenerateJob(prompt="A river", max_new_tokens=4)) for _ in range(3)
    ]
    with ResidentAgent([sys.executable, "-c", FAKE_AGENT, "2"], name="escaper") as agent:
        runs = []
        for lease in leases:
            agent.submit(lease, 1 << 20)
            runs.append(agent.collect(lease.lease_id, timeout_s=30))
    first, *later = [run.evidence for run in runs]
    assert first.sandbox_escapes == () and escape_attempts(first) is None
    for ev in later:
        assert len(ev.sandbox_escapes) == 1 and "left the agent's session" in ev.sandbox_escapes[0]
        finding = escape_attempts(ev)
        assert finding is not None and finding.reason.startswith("sandbox escape:")
    l1 = ThermodynamicLayer(registry, ProfileStore())
    judged = l1.appraise(Appraisal(lease=leases[1], raw=b"", evidence=later[0]))
    assert judged.status is Status.FAIL and judged.reason.startswith("sandbox escape")
    assert judged.details["sandbox_escapes"] == list(later[0].sandbox_escapes)
    clean = l1.appraise(Appraisal(lease=leases[0], raw=b"", evidence=first))
    assert "sandbox escape" not in clean.reason


def test_an_honest_resident_agent_is_never_flagged(tmp_path: Path, registry) -> None:
    leases = generate_leases("gpt2-micro", 3, 4, agent_id="honest")
    with honest_resident(tmp_path, 1) as agent:
        runs = [serve_wave(agent, [lease], registry, timeout_s=120)[0] for lease in leases]
        described = agent.sandbox.describe()
    for run in runs:
        assert run.receipt, run.evidence.stderr_tail
        assert run.evidence.sandbox_escapes == ()
    assert agent.sandbox.escapes == () and described["escapes"] == []
    if UNCONFINED is None:
        assert described["confinement"]["confined"] is True
        assert described["confinement"]["copies"] == [str(tmp_path / "honest.pem")]


@confined_only
def test_an_agent_started_again_gets_its_output_folder_back(tmp_path: Path) -> None:
    """A restart (same agent name, a new uid, even a new node process) can still read and add to the
    traces it kept."""
    out = tmp_path / "traces" / "alice"
    write = "import pathlib, sys; d = pathlib.Path(sys.argv[2]); print(sorted(p.name for p in d.iterdir()))\n"
    write += "(d / sys.argv[3]).write_text('kept')"
    seen, uids = [], []
    for name in ("first", "second"):
        outputs._last_holder.clear()  # as if the node process itself had been restarted
        with open_sandbox("alice") as sb:
            argv = [sys.executable, "-c", write, "--trace-dir", str(out), name]
            proc = sb.spawn(argv, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            seen.append(proc.stdout.readline().decode().strip())
            assert sb.wait(timeout=30) == 0
            uids.append(sb.describe()["confinement"]["uid"])
    assert uids[0] != uids[1]
    assert seen == ["[]", f"['{outputs.MARKER}', 'first']"]
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "first", "second"]
    with open_sandbox("bob") as sb:  # another agent naming the same folder only reads it
        argv = [sys.executable, "-c", write, "--trace-dir", str(out), "third"]
        proc = sb.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert sb.wait(timeout=30) != 0
    assert proc.stderr is not None and b"Read-only file system" in proc.stderr.read()


@confined_only
def test_a_failed_launch_fails_the_spawn_and_leaves_nothing(tmp_path: Path) -> None:
    """The agent never runs half-confined: a step that fails (here the exec) fails the spawn."""
    sb = open_sandbox("no-such-program")
    try:
        failed = r"confining the agent failed: .*exec .*no-such-program: No such file"
        with pytest.raises(RuntimeError, match=failed):
            sb.spawn([str(tmp_path / "no-such-program")])
        assert not Path(sb.describe()["confinement"]["private_tmp"]).exists()
    finally:
        sb.close()
