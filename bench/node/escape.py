"""Can an agent leave its sandbox (issue 24, item 1)? Escape attempts against the node's sandbox,
confined (the default for a root node: the agent's own uid, namespaces and file view) and, for
comparison, unconfined (POI_CONFINE=off: the agent runs as root, as before), and honest resident
agents watched for false escape flags.

Each attempt runs as a fresh sandbox's agent, which reports the pid of the process it tried to get
out. The node then does what it does at a lease's end (`check_escapes`) and closes the sandbox.
An attempt is caught when what it started did not get out: the kernel refused it (the process is
still in the sandbox's accounting and ends with it), or the node found it outside and killed it;
for the network attempts, when nothing was reached.
- cgroup_procs:<hierarchy>: a child writing its pid into one mounted hierarchy's root cgroup.procs,
  and (every_hierarchy, the issue's reproduction) into all of them; "still in the sandbox" means
  in every group that accounts it (a process that left cpuacct alone is no longer charged CPU);
- double_fork_setsid, setsid_nohup, reparent_to_init: leaving the agent's session or tree;
- tcp_host_loopback, unix_socket_host, unix_abstract_host: reaching a listener on the host (TCP on
  127.0.0.1, a world-writable Unix socket in /tmp not named on the agent's command line, an abstract
  Unix socket).
Honest: one resident honest agent serving --leases leases; a flag is any escape in a lease's evidence
or at close.

    python -m bench.node.escape [--trials 5] [--leases 100] [--model gpt2-micro]

Writes bench/results/integrity.json: sandbox_escape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maxwell_poi.node.resident_runs import generate_leases, honest_resident, serve_wave
from maxwell_poi.node.sandbox import available_sources, open_sandbox
from maxwell_poi.node.sandbox.base import Sandbox, pid_gone
from maxwell_poi.node.sandbox.cgroupfs import read_mounts
from maxwell_poi.node.sandbox.confine import ENV_CONFINE, why_unconfined
from maxwell_poi.registry.models import Registry

from ..common.results import write_result

WRITES = {"integrity.json": ["sandbox_escape"]}

TREE_ATTEMPTS = {
    "double_fork_setsid": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        print(os.getpid(), flush=True); time.sleep(100)\n    os._exit(0)\nos.wait(); time.sleep(30)",
    "reparent_to_init": "import os, time\nif os.fork() == 0:\n    if os.fork() == 0:\n"
    "        print(os.getpid(), flush=True); time.sleep(100)\n    os._exit(0)\nos.wait(); time.sleep(30)",
}
# nohup keeps a pipe as stdout: the detached shell prints its own pid, then becomes the sleep
SETSID_NOHUP = "setsid nohup sh -c 'echo $$; exec sleep 100' & sleep 30"
NETWORK_ATTEMPT = """
import json, os, socket, sys
def reach(family, address):
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
            return "reached"
    except OSError as e:
        return type(e).__name__ + (": " + e.strerror if e.strerror else "")
kind = sys.argv[1]
target = os.environ["TARGET"]
if kind == "tcp":
    got = reach(socket.AF_INET, ("127.0.0.1", int(target)))
elif kind == "abstract":
    got = reach(socket.AF_UNIX, "\\0" + target)
else:
    got = reach(socket.AF_UNIX, target)
print(json.dumps(got), flush=True)
"""


def hierarchies() -> list[Path]:
    """The root cgroup.procs of every mounted cgroup hierarchy (v1 and v2)."""
    return [m.path / "cgroup.procs" for m in read_mounts() if m.fstype in ("cgroup", "cgroup2")]


def tree_attempt(script: str, shell: bool = False) -> dict[str, Any]:
    """Run one attempt in a fresh sandbox: its agent prints the escaper's pid."""
    sb = open_sandbox("escape-bench")
    argv = ["sh", "-c", script] if shell else [sys.executable, "-c", script]
    try:
        proc = sb.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        time.sleep(0.1)
        held = pid in sb.held()
        t0 = time.perf_counter()
        found = [e for e in sb.check_escapes() if e.pid == pid]
        scan_ms = (time.perf_counter() - t0) * 1000
    finally:
        sb.close()
    deadline = time.monotonic() + 5
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = pid_gone(pid)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return {
        "held": held,
        "reported": [e.reason for e in found],
        "gone_after_close": gone,
        "caught": gone and (held or bool(found)),
        "refused": "Permission denied" in stderr,
        "scan_ms": scan_ms,
    }


def network_attempt(kind: str, target: str) -> dict[str, Any]:
    with open_sandbox("escape-bench") as sb:
        proc = sb.spawn(
            [sys.executable, "-c", NETWORK_ATTEMPT, kind],
            env={**os.environ, "TARGET": target},
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        got = json.loads(proc.stdout.readline())
        sb.wait(timeout=30)
    return {"outcome": got, "caught": got != "reached"}


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"attempts": len(runs), "caught": sum(r["caught"] for r in runs)}
    if "held" in runs[0]:
        out["refused_by_the_kernel"] = sum(r["refused"] for r in runs)
        out["still_in_the_sandbox"] = sum(r["held"] for r in runs)
        out["reported_as_escape"] = sum(bool(r["reported"]) for r in runs)
        out["gone_after_close"] = sum(r["gone_after_close"] for r in runs)
        example = next((r["reported"][0] for r in runs if r["reported"]), None)
        if example:
            out["example_reason"] = example
    else:
        out["outcomes"] = sorted({r["outcome"] for r in runs})
    print(f"  {name}: caught {out['caught']}/{out['attempts']}", flush=True)
    return out


def attempts(trials: int) -> dict[str, Any]:
    """Every attempt `trials` times under the current confinement setting."""
    plan: dict[str, Callable[[], dict[str, Any]]] = {}
    every = " ".join(str(p) for p in hierarchies())
    for procs in hierarchies():
        script = f"sleep 100 & echo $! > {procs}; echo $!; sleep 30"
        plan[f"cgroup_procs:{procs.parent.name}"] = lambda s=script: tree_attempt(s, shell=True)
    # the reproduction: every hierarchy at once
    repro = f'sleep 100 & for f in {every}; do echo $! > "$f"; done; echo $!; sleep 30'
    plan["cgroup_procs:every_hierarchy"] = lambda: tree_attempt(repro, shell=True)
    for name, script in TREE_ATTEMPTS.items():
        plan[name] = lambda s=script: tree_attempt(s)
    plan["setsid_nohup"] = lambda: tree_attempt(SETSID_NOHUP, shell=True)
    host = Path(tempfile.mkdtemp(prefix="escape-bench-"))
    host.chmod(0o755)
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(host / "host.sock"))
    (host / "host.sock").chmod(0o666)  # anyone may connect who can see it
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0poi-escape-bench-{os.getpid()}")
    for s in (unix, abstract):
        s.listen()
    plan["tcp_host_loopback"] = lambda: network_attempt("tcp", str(tcp.getsockname()[1]))
    plan["unix_socket_host"] = lambda: network_attempt("unix", str(host / "host.sock"))
    plan["unix_abstract_host"] = lambda: network_attempt("abstract", f"poi-escape-bench-{os.getpid()}")
    try:
        return {name: summarise(name, [run() for _ in range(trials)]) for name, run in plan.items()}
    finally:
        for s in (tcp, unix, abstract):
            s.close()
        (host / "host.sock").unlink(missing_ok=True)
        host.rmdir()


def honest(model: str, leases: int, tokens: int) -> dict[str, Any]:
    registry = Registry()
    with tempfile.TemporaryDirectory() as tmp:
        runs, scans = [], []
        with honest_resident(Path(tmp), 1) as agent:
            for lease in generate_leases(model, leases, tokens, agent_id="honest"):
                runs.append(serve_wave(agent, [lease], registry, timeout_s=300)[0])
            for _ in range(20):
                t0 = time.perf_counter()
                agent.sandbox.check_escapes()
                scans.append((time.perf_counter() - t0) * 1000)
            confinement = agent.sandbox.describe()["confinement"]
        at_close = agent.sandbox.describe()["escapes"]
    flagged = sum(bool(r.evidence.sandbox_escapes) for r in runs)
    answered = sum(bool(r.receipt) for r in runs)
    print(f"  honest: {flagged} of {len(runs)} leases flagged, {answered} answered", flush=True)
    return {
        "model": model,
        "tokens": tokens,
        "leases": len(runs),
        "answered": answered,
        "flagged": flagged,
        "flagged_at_close": len(at_close),
        "confined": confinement["confined"],
        "escape_scan_ms_median": round(statistics.median(scans), 2),
    }


def spawn_cost(n: int = 10) -> dict[str, float]:
    """Median ms from spawn() to the agent's program running, confined and not."""
    out = {}
    for label, setting in (("confined", None), ("unconfined", "off")):
        with env_setting(setting):
            times = []
            for _ in range(n):
                with open_sandbox("spawn-cost") as sb:
                    t0 = time.perf_counter()
                    proc = sb.spawn(["true"])
                    times.append((time.perf_counter() - t0) * 1000)
                    proc.wait()
            out[f"{label}_spawn_ms_median"] = round(statistics.median(times), 1)
    return out


class env_setting:  # noqa: N801 - used as a context manager, read as a phrase
    """POI_CONFINE set to `value` (None: unset) for the block."""

    def __init__(self, value: str | None) -> None:
        self.value, self.old = value, os.environ.get(ENV_CONFINE)

    def __enter__(self) -> None:
        os.environ.pop(ENV_CONFINE, None)
        if self.value is not None:
            os.environ[ENV_CONFINE] = self.value

    def __exit__(self, *_: object) -> None:
        os.environ.pop(ENV_CONFINE, None)
        if self.old is not None:
            os.environ[ENV_CONFINE] = self.old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5, help="runs of each attempt, per setting")
    ap.add_argument("--leases", type=int, default=100, help="honest resident leases")
    ap.add_argument("--model", default="gpt2-micro")
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    with env_setting(None):
        reason = why_unconfined()
        if reason is not None:
            raise SystemExit(f"this bench measures confinement, and this node cannot confine: {reason}")
        print("confined:", flush=True)
        confined = attempts(args.trials)
        honest_runs = honest(args.model, args.leases, args.tokens)
    with env_setting("off"):
        print("unconfined (POI_CONFINE=off):", flush=True)
        unconfined = attempts(args.trials)
    sources = {s.value: why or "usable" for s, why in available_sources().items()}
    sb: Sandbox = open_sandbox("source")
    source = sb.source.value
    sb.close()
    value = {
        "confined": confined,
        "unconfined": unconfined,
        "honest": honest_runs,
        "cost": spawn_cost(),
        "setup": {"source": source, "sources": sources, "kernel": platform.release(), "trials": args.trials},
    }
    print(json.dumps(value["cost"]), flush=True)
    write_result("integrity.json", "sandbox_escape", value, writes=WRITES)


if __name__ == "__main__":
    main()
