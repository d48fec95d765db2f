"""What the GPU scripts record about where they ran: machine, virtualisation, CUDA runtime and
driver, the settings that decide floating-point precision, the project commit; an atomic JSON
write; and `Run`, the result that is saved after every trial and records failures and skips
(cross_hardware.py, next_run.py). Imports only the standard library at import time (torch and
pynvml inside the functions), and nothing of maxwell_poi, so collect_traces.py can use it when the
package does not import.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def commit_of(given: str | None) -> str:
    """The project commit: --commit, else $POI_COMMIT, else `git rev-parse HEAD` (the device
    machine's copy has no .git, so the caller passes POI_COMMIT=$(git rev-parse HEAD))."""
    if given:
        return given
    if os.environ.get("POI_COMMIT"):
        return os.environ["POI_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip() + " (read from .git here)"
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no --commit, no POI_COMMIT, no .git)"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def virtualisation() -> dict[str, Any]:
    """Hints of whether this is a VM (and which): on the lent machine NVML is the guest's driver."""
    kernel = platform.release()
    hints: dict[str, Any] = {"kernel": kernel, "kernel_version": platform.version()}
    if shutil.which("systemd-detect-virt"):
        try:
            out = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True, timeout=5)
            hints["systemd_detect_virt"] = out.stdout.strip() or f"exit {out.returncode}"
        except (OSError, subprocess.SubprocessError) as e:
            hints["systemd_detect_virt"] = f"failed: {e}"
    for name in ("product_name", "sys_vendor", "board_vendor"):
        value = _read(f"/sys/class/dmi/id/{name}")
        if value:
            hints[f"dmi_{name}"] = value
    cpuinfo = _read("/proc/cpuinfo") or ""
    hints["cpu_hypervisor_flag"] = any(
        line.startswith("flags") and " hypervisor" in line for line in cpuinfo.splitlines()
    )
    text = " ".join(str(v) for v in hints.values()).lower()
    detected = str(hints.get("systemd_detect_virt", "none"))
    if "firecracker" in text or "-fc-" in kernel:
        guess = "firecracker" + ("" if "firecracker" in text else " (kernel name has -fc-)")
    elif detected not in ("none", "") and not detected.startswith(("exit", "failed")):
        guess = detected
    elif kernel.startswith("4.4.0"):
        guess = "gvisor? (kernel reports 4.4.0)"
    else:
        guess = next((w for w in ("kvm", "qemu", "vmware", "xen", "hyper-v", "amazon") if w in text), None)
        if guess is None and hints["cpu_hypervisor_flag"]:
            guess = "some hypervisor (cpu flag)"
    hints["guess"] = guess or "none seen (bare metal or hidden)"
    return hints


def cuda_versions() -> dict[str, Any]:
    """CUDA runtime (torch's build), the driver's CUDA version and driver version (NVML), cuDNN,
    the card and its compute capability; each missing piece says why."""
    info: dict[str, Any] = {}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_runtime"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["card"] = torch.cuda.get_device_name(0)
            info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["cuda_driver_api"] = _cuda_driver_api()
    except Exception as e:  # noqa: BLE001 - an environment record must not fail the run
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = v.decode() if isinstance(v, bytes) else v
            cv = pynvml.nvmlSystemGetCudaDriverVersion()
            info["driver_cuda"] = f"{cv // 1000}.{cv % 1000 // 10}"
            info["nvml"] = _decoded(pynvml.nvmlSystemGetNVMLVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001
        info["driver"] = f"unknown ({type(e).__name__}: {e})"
    return info


def _decoded(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _cuda_driver_api() -> str | None:
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"{v.value // 1000}.{v.value % 1000 // 10}"
    except OSError:
        pass
    return None


def precision_settings() -> dict[str, Any]:
    """The switches that decide what 'fp32' means on the GPU, as they are now."""
    try:
        import torch
    except ImportError as e:
        return {"error": str(e)}
    cuda = torch.backends.cuda
    settings: dict[str, Any] = {}
    for name, read in [
        ("cuda_matmul_allow_tf32", lambda: cuda.matmul.allow_tf32),
        ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
        ("float32_matmul_precision", torch.get_float32_matmul_precision),
        ("cuda_matmul_fp32_precision", lambda: cuda.matmul.fp32_precision),  # torch >= 2.9 names
        ("cudnn_conv_fp32_precision", lambda: torch.backends.cudnn.conv.fp32_precision),
        (
            "cuda_matmul_allow_bf16_reduced_precision_reduction",
            lambda: cuda.matmul.allow_bf16_reduced_precision_reduction,
        ),
        ("sdpa_flash_enabled", cuda.flash_sdp_enabled),
        ("sdpa_mem_efficient_enabled", cuda.mem_efficient_sdp_enabled),
        ("sdpa_math_enabled", cuda.math_sdp_enabled),
        ("sdpa_cudnn_enabled", lambda: cuda.cudnn_sdp_enabled()),
        ("deterministic_algorithms", torch.are_deterministic_algorithms_enabled),
    ]:
        try:
            settings[name] = read()
        except Exception as e:  # noqa: BLE001 - an older or newer torch may lack one
            settings[name] = f"unreadable ({type(e).__name__})"
    return settings


def environment(commit: str) -> dict[str, Any]:
    """The environment block both scripts write into their results."""
    return {
        "commit": commit,
        "host": platform.node(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "virtualisation": virtualisation(),
        "cuda": cuda_versions(),
        "precision_at_start": precision_settings(),
    }


def finite(x: Any) -> Any:
    """`x` with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    """Write to a temp file beside `path`, then rename over it: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(finite(data), indent=indent, allow_nan=False, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# the result being built, saved after every trial


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Terminated(BaseException):
    """SIGTERM arrived (from `timeout`): not an Exception, so trial wrappers let it through."""


class Run:
    """The result being built: saved atomically after every trial; failures and skips recorded.

    `budget_s` is the global deadline (from construction); `section(name, seconds)` adds a
    sub-budget for one section, from the moment it is called: a trial is skipped (and listed,
    with the reason) when the time left before the earlier of the two deadlines is less than 1.2
    times the section's last trial, or an estimate given to `trial(..., need_s=)`."""

    def __init__(self, out: Path, result: dict[str, Any], budget_s: float | None) -> None:
        self.out, self.result = out, result
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s if budget_s else None
        self.section_deadline: dict[str, float] = {}
        self.last_s: dict[str, float] = {}  # the last trial's duration per section (deadline estimate)
        result.setdefault("errors", [])
        result.setdefault("skipped", [])

    def save(self) -> None:
        self.result["wall_s"] = round(time.monotonic() - self.t0, 1)
        write_json_atomic(self.out, self.result)

    def section(self, name: str, seconds: float) -> None:
        """Sub-budget for section `name`: no trial of it starts later than `seconds` from now."""
        self.section_deadline[name] = time.monotonic() + seconds

    def left(self, section: str) -> float:
        """Seconds left before the section's (or the run's) deadline; inf without either."""
        ends = [d for d in (self.deadline, self.section_deadline.get(section)) if d is not None]
        return min(ends) - time.monotonic() if ends else float("inf")

    def error(self, section: str, trial: str | None, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(exc))
        self.result["errors"].append(
            {
                "section": section,
                "trial": trial,
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": tb[-6000:],
                "at_s": round(time.monotonic() - self.t0, 1),
            }
        )
        log(f"!! {section} / {trial or '(section)'}: {type(exc).__name__}: {exc}")
        self.save()

    def skip(self, section: str, trial: str, why: str) -> None:
        self.result["skipped"].append({"section": section, "trial": trial, "reason": why})
        log(f"skip {section} / {trial}: {why}")
        self.save()

    def trial(
        self, section: str, trial: str, fn: Callable[[], Any], need_s: float | None = None
    ) -> Any | None:
        """fn() or, when it raises or no longer fits the budget, None (recorded, saved)."""
        left = self.left(section)
        if left != float("inf"):
            last = self.last_s.get(section, 0.0)
            need = max(1.2 * last, need_s or 0.0)
            if left < need or left <= 0:
                basis = f"the last {section} trial took {last:.0f} s" if last else f"needs ~{need:.0f} s"
                self.skip(section, trial, f"budget: {left:.0f} s left, {basis}")
                return None
        t = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # one trial failing must not cost the others
            self.error(section, trial, e)
            return None
        finally:
            self.last_s[section] = time.monotonic() - t
        return value
