"""The step between the node and a confined agent: run as root, already inside the sandbox's cgroup,
it gives the agent its own namespaces and file view, drops every privilege, and execs the agent.

Run by path with the standard library only (`python -I -S launch.py SPEC`): it must start fast and
must not import the package (whose files the agent may not be allowed to see). SPEC is JSON (uid,
gid, status_fd, steps, cwd: `confine.Confinement.wrap`); the agent's argv follows it. In order:

1. `setsid`: the agent leads a session of its own (the node finds stragglers by it);
2. new mount, network, IPC and UTS namespaces (`unshare`): no network device but a downed loopback,
   no SysV IPC shared with the host, mounts private to the agent;
3. the file view: an empty tmpfs over each masked directory (private /tmp, /var/tmp, /dev/shm,
   /run/lock; homes that hide what the agent needs), then each granted path bound back read-only
   (sources opened before masking), the agent's private directory bound read-write; /proc remounted
   with hidepid=2, so the agent sees only its own processes;
4. no capabilities left in the bounding set, no supplementary groups, the sandbox's gid and uid
   (real, effective and saved), PR_SET_NO_NEW_PRIVS (a setuid binary gives nothing back);
5. one JSON line on the status fd saying what was done, then exec: the status fd is close-on-exec,
   so the node reads end-of-file exactly when the agent's program replaced this one. A failed step
   writes {"error": ...} there instead and exits 126; the agent never runs half-confined.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
LAST_CAP_GUESS = 63  # /proc/sys/kernel/cap_last_cap says the real one; extra drops fail with EINVAL
NAMESPACES = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
EXIT_LAUNCH_FAILED = 126

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class LaunchError(RuntimeError):
    """A confinement step failed; the message names the step and the kernel's answer."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")


def _enc(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data))
    _check(rc, f"mount {source or fstype or ''} on {target}")


def prctl(option: int, arg: int) -> int:
    return _libc.prctl(option, arg, 0, 0, 0)


def _make_mountpoint(target: str, is_dir: bool) -> None:
    """A bind needs something to cover; masked directories are fresh tmpfs, so create it there."""
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if is_dir:
        os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))


def set_up_files(steps: list[dict]) -> None:
    """Masks and binds in the given order (outer before inner); every bind's source is opened
    before anything is hidden, so it is the host's file whatever a mask later covers."""
    sources = {s["bind"]: os.open(s["bind"], os.O_PATH | os.O_CLOEXEC) for s in steps if "bind" in s}
    for step in steps:
        if "mask" in step:
            os.makedirs(step["mask"], mode=0o755, exist_ok=True)  # only ever inside an earlier mask
            mount("tmpfs", step["mask"], "tmpfs", MS_NOSUID | MS_NODEV, f"mode={step['mode']}")
            continue
        source = f"/proc/self/fd/{sources[step['bind']]}"
        _make_mountpoint(step["at"], os.path.isdir(source))
        mount(source, step["at"], None, MS_BIND)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if step["writable"] else MS_RDONLY)
        mount(None, step["at"], None, flags)
    for fd in sources.values():
        os.close(fd)


def drop_privileges(uid: int, gid: int) -> None:
    for cap in range(LAST_CAP_GUESS + 1):
        if prctl(PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            _check(-1, f"PR_CAPBSET_DROP {cap}")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # all three non-zero: the kernel clears permitted and effective caps
    _check(prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")
    if os.getresuid() != (uid, uid, uid) or os.getgroups():
        raise LaunchError(f"still uid {os.getresuid()} groups {os.getgroups()} after dropping to {uid}")


def capabilities() -> dict[str, str]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of this process, as the kernel reports them."""
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f) if k.startswith("Cap")}


def confine(spec: dict) -> dict:
    """Everything before exec; returns what was done (the status line)."""
    os.setsid()
    _check(_libc.unshare(NAMESPACES), "unshare(mnt, net, ipc, uts)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    set_up_files(spec["steps"])
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    if spec.get("cwd"):  # again: the old cwd points into the host's view, under the masks
        os.makedirs(spec["cwd"], mode=0o755, exist_ok=True)  # missing only inside a mask
        os.chdir(spec["cwd"])
    drop_privileges(spec["uid"], spec["gid"])
    caps = capabilities()
    if any(int(caps.get(k, "0"), 16) for k in ("CapPrm", "CapEff", "CapAmb")):
        raise LaunchError(f"capabilities left after dropping: {caps}")
    return {"ok": True, "uid": os.getuid(), "gid": os.getgid(), "sid": os.getsid(0), **caps}


def probe(uid: int) -> dict:
    """Can this machine confine? The same kernel calls on throwaway state (a fresh process)."""
    _check(_libc.unshare(NAMESPACES), "unshare(mnt, net, ipc, uts)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    drop_privileges(uid, uid)
    return {"ok": True}


def _report(fd: int, data: dict) -> None:
    os.write(fd, json.dumps(data).encode() + b"\n")


def main() -> None:
    if sys.argv[1] == "--probe":
        try:
            print(json.dumps(probe(int(sys.argv[2]))))
        except (OSError, LaunchError) as exc:
            print(json.dumps({"error": str(exc)}))
        return
    spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
    fd = spec["status_fd"]
    os.set_inheritable(fd, False)  # closes at exec: end-of-file tells the node the agent runs
    try:
        _report(fd, confine(spec))
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise LaunchError(f"exec {argv[0]}: {exc.strerror or exc}") from exc
    except (OSError, LaunchError) as exc:
        _report(fd, {"error": f"{type(exc).__name__}: {exc}"})
        os._exit(EXIT_LAUNCH_FAILED)


if __name__ == "__main__":
    main()
