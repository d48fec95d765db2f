"""What both GPU scripts record about where they ran: machine, virtualisation, CUDA runtime and
driver, the settings that decide floating-point precision, the project commit; and an atomic JSON
write. Imports only the standard library at import time (torch and pynvml inside the functions),
and nothing of maxwell_poi, so collect_traces.py can use it when the package does not import.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
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
