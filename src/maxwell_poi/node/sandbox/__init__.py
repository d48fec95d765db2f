"""Resident agent sandboxes: one long-lived process tree per agent, in its own cgroup where the
kernel allows, so CPU time and memory of everything the agent ran come from kernel accounting.

`open_sandbox` picks the best source this machine offers (cgroup v2, then v1, then a /proc tree
walk) and records on the sandbox why each better one was not usable. Every kind confines its agent
the same way where the node is root (confine.py: its own uid, mount/network/IPC/UTS namespaces, a
file view of what it needs, no capabilities) and finds its escaped processes (escapes.py);
`describe()` says what was confined and, where nothing was, why.
"""

from __future__ import annotations

import os

from .base import (
    TRUST_RANK,
    AccountingSource,
    Sandbox,
    SandboxTrust,
    SandboxUnavailable,
    Usage,
)
from .cgroup_v1 import CgroupV1Sandbox
from .cgroup_v2 import CgroupV2Sandbox
from .proctree import ProcTreeSandbox
from .resolution import measure_resolution

__all__ = [
    "TRUST_RANK",
    "AccountingSource",
    "CgroupV1Sandbox",
    "CgroupV2Sandbox",
    "ProcTreeSandbox",
    "Sandbox",
    "SandboxTrust",
    "SandboxUnavailable",
    "Usage",
    "available_sources",
    "measure_resolution",
    "open_sandbox",
]

ENV_FORCE = "POI_SANDBOX"
ORDER = (AccountingSource.CGROUP_V2, AccountingSource.CGROUP_V1, AccountingSource.PROC)
# Where a sandbox kind plugs in. A microVM kind (not built: docs/node.md, "A VM instead of a
# cgroup") is one more entry here and in ORDER, ahead of the cgroups: `spawn` boots a Firecracker
# microVM through its jailer (or QEMU's `microvm` machine under KVM) with the agent's image and its
# channel on a vsock; `usage` reads the cgroup the jailer puts the VMM and its vCPU threads in (the
# cgroup readers here); `pids` is the VMM process; `close` stops the VM and removes the group. The
# guest kernel is then the boundary: Confinement would run the VMM itself unprivileged, and
# escapes.py would watch the VMM's processes only (a guest process cannot leave the VM).
KINDS: dict[AccountingSource, type[Sandbox]] = {
    AccountingSource.CGROUP_V2: CgroupV2Sandbox,
    AccountingSource.CGROUP_V1: CgroupV1Sandbox,
    AccountingSource.PROC: ProcTreeSandbox,
}


def available_sources() -> dict[AccountingSource, str | None]:
    """Each source in preference order: None if usable here, else why not. Reads only; creating a
    group can still fail (open_sandbox then falls back and says why)."""
    return {s: KINDS[s].probe() for s in ORDER}


def _forced() -> AccountingSource | None:
    raw = os.environ.get(ENV_FORCE, "").strip()
    if not raw:
        return None
    try:
        return AccountingSource(raw)
    except ValueError:
        known = ", ".join(s.value for s in AccountingSource)
        raise RuntimeError(f"{ENV_FORCE}={raw!r}: expected one of {known}") from None


def open_sandbox(name: str, prefer: AccountingSource | None = None) -> Sandbox:
    """A new sandbox for agent `name`, from the best usable source.

    `prefer` is tried first, then the usual order (cgroup v2, v1, proc). POI_SANDBOX=<source>
    overrides both and is strict: if that source is unusable this raises RuntimeError saying why.
    The returned sandbox's `fallback_reason` says why each source tried before it was not used.
    """
    forced = _forced()
    if forced is not None:
        try:
            return KINDS[forced](name)
        except SandboxUnavailable as e:
            raise RuntimeError(
                f"{ENV_FORCE}={forced.value} expected {forced.value} accounting, found: {e}"
            ) from e
    order = list(ORDER) if prefer is None else [prefer, *(s for s in ORDER if s != prefer)]
    reasons: list[str] = []
    for source in order:
        try:
            sandbox = KINDS[source](name)
        except SandboxUnavailable as e:
            reasons.append(str(e))
            continue
        sandbox.fallback_reason = "; ".join(reasons) or None
        return sandbox
    raise RuntimeError("no sandbox source usable: " + "; ".join(reasons))
