"""`poi trace`: draw what Maxwell measured of one lease, next to what honest work looks like.

One PNG, two or three stacked panels on Maxwell's clock (seconds since the agent started), one
function each:

1. `cpu_panel`     the agent's CPU (cores busy, from the Observer's process source), with GPU power
                   on a twin axis when an NVML source watched the lease;
2. `token_panel`   tokens streamed so far, with the pace the reference profile expects from the
                   first token on (its median, the range of its honest runs, and L2's fastest-allowed
                   line), and on a twin axis the agent's CPU seconds per decoded token so far against
                   L1's honest mean and lower bound;
3. `memory_panel`  resident memory, with the sampled peak and L1's memory floor.

Reads only the evidence and result JSON the runner and verifier already wrote; matplotlib is
imported inside the functions, so verifying a lease never imports it.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..adversaries import CATALOGUE
from ..observer.evidence import LeaseEvidence
from ..observer.telemetry.trace import Measurement
from ..protocol.result import Status, Verdict
from ..registry.models import Registry
from ..registry.profiles import Profile, ProfileStore
from ..verifier.boundary import interval_lower_bound
from ..verifier.thermodynamic import memory_floor_mb, per_token_stats, stats_lower_bound

VERDICT_COLOURS = {
    Verdict.AFFIRMING: "#2e7d32",
    Verdict.WARNING: "#ef6c00",
    Verdict.CONTRAINDICATED: "#c62828",
}
CPU_C, GPU_C, TOK_C, WORK_C, RSS_C, BAND_C, BOUND_C = (
    "#1565c0",
    "#6a1b9a",
    "#212121",
    "#8e24aa",
    "#00838f",
    "#9e9e9e",
    "#c62828",
)


def _series(m: Measurement | None, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(t, y) of one telemetry series with NaN samples dropped, or None when absent or empty."""
    if m is None or name not in m.series or not len(m.t):
        return None
    t, y = m.t, m.series[name]
    ok = np.isfinite(t) & np.isfinite(y)
    return (t[ok], y[ok]) if ok.any() else None


def _source(telemetry: dict[str, Measurement], prefix: str) -> tuple[str, Measurement] | None:
    for name, m in telemetry.items():
        if name == prefix or name.startswith(prefix + ":"):
            return name, m
    return None


def _offset(m: Measurement, ev: LeaseEvidence) -> float:
    """Seconds from the agent's start to the telemetry window's start (both on Maxwell's clock)."""
    off = m.started_at - ev.started_at
    return off if math.isfinite(off) and abs(off) < 60 else 0.0


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#616161", fontsize=10)


def _header(ev: LeaseEvidence, result: dict[str, Any] | None, title: str) -> tuple[str, str, str]:
    """(headline, its colour, small wrapped text of the failing layers' reasons)."""
    verdict = (result or {}).get("verdict", "not appraised")
    head = f"{title}  —  {verdict}" if title else str(verdict)
    lines = []
    for layer in (result or {}).get("layers", []):
        if layer.get("status") in (Status.FAIL, Status.WARN):
            lines += textwrap.wrap(
                f"{layer.get('layer', '?')} {layer['status'].upper()}: {layer.get('reason', '')}",
                width=150,
                subsequent_indent="    ",
            )
    if not lines:
        lines.append(f"wall {ev.wall_s:.2f} s, agent CPU {ev.cpu_s:.2f} s, exit code {ev.exit_code}")
    return head, VERDICT_COLOURS.get(str(verdict), "#424242"), "\n".join(lines[:8])


def cpu_panel(ax, ev: LeaseEvidence) -> None:
    """Cores busy (process telemetry, else the CPU readings at token arrivals), GPU power twin."""
    stream_t, stream_cpu = np.asarray(ev.stream_t, float), np.asarray(ev.stream_cpu_s, float)
    proc = _source(ev.telemetry, "process")
    cpu = _series(proc[1], "cpu_util") if proc else None
    handles = []
    if cpu is not None:
        t, y = cpu
        handles += ax.plot(t + _offset(proc[1], ev), y, color=CPU_C, lw=1.2, label="agent CPU")
    elif len(stream_t) >= 2 and len(stream_cpu) == len(stream_t):
        dt = np.diff(stream_t)
        rate = np.divide(np.diff(stream_cpu), dt, out=np.zeros_like(dt), where=dt > 0)
        handles += ax.step(
            stream_t[1:],
            rate,
            where="pre",
            color=CPU_C,
            lw=1,
            ls="--",
            label="agent CPU (from stream readings)",
        )
    else:
        _no_data(ax, "no process telemetry")
    if ev.wall_s > 0:
        busy = ev.cpu_s / ev.wall_s
        handles.append(ax.axhline(busy, color=CPU_C, ls=":", lw=1, label=f"mean {busy:.2f} cores"))
    ax.set_ylabel("CPU (cores busy)")
    ax.set_ylim(bottom=0)
    nvml = _source(ev.telemetry, "nvml")
    power = _series(nvml[1], "power_w") if nvml else None
    if power is not None:
        ax_gpu = ax.twinx()
        t, y = power
        handles += ax_gpu.plot(
            t + _offset(nvml[1], ev), y, color=GPU_C, lw=1.2, label=f"GPU power ({nvml[0]})"
        )
        ax_gpu.set_ylabel("GPU power (W)", color=GPU_C)
        ax_gpu.set_ylim(bottom=0)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)


def token_panel(ax, ev: LeaseEvidence, profile: Profile | None) -> None:
    """Tokens streamed vs Maxwell's clock against the profile's pace; CPU-ms per token twin."""
    stream_t, stream_cpu = np.asarray(ev.stream_t, float), np.asarray(ev.stream_cpu_s, float)
    n = len(stream_t)
    ax.set_ylabel("tokens streamed")
    if not n:
        _no_data(ax, "no token stream")
        ax.set_ylim(0, 1)
        return
    handles = ax.step(
        stream_t, np.arange(1, n + 1), where="post", color=TOK_C, lw=1.6, label="tokens streamed"
    )
    if profile is not None:
        t0, k = stream_t[0], np.arange(n)
        iv = profile.interval_s
        ax.fill_betweenx(k + 1, t0 + k * iv.min, t0 + k * iv.max, color=BAND_C, alpha=0.25, lw=0)
        handles.append(ax.fill_between([], [], color=BAND_C, alpha=0.25, label="honest profile runs (range)"))
        handles += ax.plot(
            t0 + k * iv.median,
            k + 1,
            color=BAND_C,
            lw=1.2,
            label=f"profile median pace ({iv.median * 1000:.1f} ms/token)",
        )
        lo = interval_lower_bound(profile)
        handles += ax.plot(
            t0 + k * lo,
            k + 1,
            color=BOUND_C,
            ls="--",
            lw=1,
            label=f"fastest allowed, L2 ({lo * 1000:.1f} ms/token)",
        )
    else:
        ax.text(
            0.01,
            0.95,
            "no reference profile for this model and device: no expected band",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="#616161",
        )
    ax.set_ylim(0, n * 1.08 + 1)
    if n >= 2 and len(stream_cpu) == n:
        handles += _work_twin(ax, ev, stream_t, stream_cpu, profile)
    ax.legend(handles=handles, loc="upper left", fontsize=7, framealpha=0.85)


def _work_twin(
    ax, ev: LeaseEvidence, stream_t: np.ndarray, stream_cpu: np.ndarray, profile: Profile | None
) -> list:
    """CPU-ms per token so far, against L1's honest mean and lower bound over the decode window.
    A batched lease shares its sandbox's CPU with its peers: per token of the batch, as L1 judges."""
    n = len(stream_t)
    ax_work = ax.twinx()
    window = ev.decode_window
    share = window.batch_tokens / window.tokens if window else 1.0  # batch tokens per own token
    per = (stream_cpu[1:] - stream_cpu[0]) / (np.arange(1, n) * share) * 1000
    of_batch = " of the batch" if ev.co_leases else ""
    handles = ax_work.plot(
        stream_t[1:], per, color=WORK_C, lw=1, alpha=0.9, label=f"agent CPU-ms per token{of_batch} (so far)"
    )
    levels = per[np.isfinite(per)].tolist()
    stats = per_token_stats(profile, ev) if profile is not None else None
    if profile is not None and stats is not None:
        mean = stats.mean * 1000
        lo_w = stats_lower_bound(stats, profile.regime) * 1000
        levels += [mean, lo_w]
        span = [stream_t[0], stream_t[-1]]  # L1 compares the CPU seconds spent over this window
        handles += ax_work.plot(
            span, [mean, mean], color=WORK_C, ls=":", lw=1.2, label=f"profile {mean:.1f} CPU-ms/token"
        )
        handles += ax_work.plot(
            span, [lo_w, lo_w], color=WORK_C, ls="-.", lw=1.2, label=f"least allowed, L1 ({lo_w:.1f})"
        )
    ax_work.set_ylim(0, 1.15 * max([1e-3, *levels]))
    ax_work.set_ylabel("CPU-ms / token", color=WORK_C)
    return handles


def memory_panel(ax, ev: LeaseEvidence, profile: Profile | None, floor_mb: float | None, embed: bool) -> None:
    """Resident memory over time, the sampled peak, L1's floor and the honest peak band."""
    proc = _source(ev.telemetry, "process")
    rss = _series(proc[1], "rss_mb") if proc else None
    handles = []
    levels = [1.0]
    if rss is not None:
        t, y = rss
        handles += ax.plot(t + _offset(proc[1], ev), y, color=RSS_C, lw=1.2, label="agent RSS")
        levels.append(float(y.max()))
    else:
        _no_data(ax, "no process telemetry")
    peak = ev.peak_rss_mb()
    if peak > 0:
        levels.append(peak)
        handles.append(ax.axhline(peak, color=RSS_C, ls=":", lw=1, label=f"peak (sampled) {peak:.0f} MB"))
    if floor_mb is not None and math.isfinite(floor_mb):
        if floor_mb > 0:
            levels.append(floor_mb)
            handles.append(
                ax.axhline(floor_mb, color=BOUND_C, ls="--", lw=1, label=f"floor, L1 ({floor_mb:.0f} MB)")
            )
        else:
            handles.append(
                ax.plot([], [], color=BOUND_C, ls="--", label=f"floor, L1 ≤ 0 MB ({floor_mb:.0f})")[0]
            )
    if profile is not None and not embed:
        r = profile.peak_rss_mb
        levels.append(r.max)
        ax.axhspan(r.min, r.max, color=BAND_C, alpha=0.2, lw=0)
        handles.append(ax.fill_between([], [], color=BAND_C, alpha=0.2, label="honest peak RSS (range)"))
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, 1.15 * max(levels))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.85)


def plot_run(
    ev: LeaseEvidence,
    result: dict[str, Any] | None,
    profile: Profile | None,
    out: Path,
    title: str = "",
    *,
    memory_floor_mb: float | None = None,
    job: str = "",
) -> Path:
    """Draw one lease's evidence to `out` as a PNG; returns `out`.

    `result` is AttestationResult.as_dict() (or None), `profile` the reference profile for the
    lease's model on its device class (or None: no band), `memory_floor_mb` L1's floor when the
    weights' size is known, `job` "generate" or "embed" ("embed" drops the token panel).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    embed = job == "embed"
    head, colour, small = _header(ev, result, title)
    n_lines = small.count("\n") + 1 if small else 0
    fig = Figure(figsize=(10, 7), dpi=110)
    FigureCanvasAgg(fig)
    line = 1.0 / (fig.get_figheight() * 72)  # one point, as a fraction of the figure's height
    top = 0.985 - 18 * line - (9 * n_lines + 6 if n_lines else 0) * line
    fig.subplots_adjust(left=0.08, right=0.88, top=top, bottom=0.08, hspace=0.12)
    ratios = [1, 1.15] if embed else [1, 1.4, 1]
    axes = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    fig.text(0.5, 0.985, head, ha="center", va="top", fontsize=12, fontweight="bold", color=colour)
    if small:
        fig.text(0.08, 0.985 - 20 * line, small, ha="left", va="top", fontsize=7, color="#424242")
    decode = (ev.stream_t[0], ev.stream_t[-1]) if len(ev.stream_t) >= 2 else None
    for ax in axes:
        ax.grid(True, alpha=0.25)
        if decode:
            ax.axvspan(*decode, color="#fff3e0", zorder=0)
    cpu_panel(axes[0], ev)
    if not embed:
        token_panel(axes[1], ev, profile)
    memory_panel(axes[-1], ev, profile, memory_floor_mb, embed)
    x_max = max(
        [ev.wall_s, ev.stream_t[-1] if ev.stream_t else 0.0]
        + [_offset(m, ev) + m.duration_s for m in ev.telemetry.values()]
    )
    xlabel = (
        "seconds since the lease was handed to the resident agent (Maxwell's clock)"
        if ev.regime != "oneshot"
        else "seconds since the agent started (Maxwell's clock)"
    )
    axes[-1].set_xlabel(xlabel + ("; shaded: first to last token" if decode else ""))
    axes[-1].set_xlim(0, x_max * 1.02 if x_max > 0 else 1)
    if embed:
        axes[0].set_title("embedding lease: no token stream", fontsize=8, color="#616161", loc="right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def trace_inputs(
    evidence_path: Path, result_path: Path | None, lease_path: Path | None = None
) -> tuple[LeaseEvidence, dict[str, Any] | None, dict[str, Any] | None]:
    """Read and check (evidence, result, lease); a ValueError names the bad file and field."""
    evidence = LeaseEvidence.from_dict(_load_json(evidence_path, "evidence"), f"evidence {evidence_path}")
    result = _load_json(result_path, "result") if result_path is not None else None
    if result is not None and not isinstance(result.get("layers", []), list):
        raise ValueError(f"result {result_path}: layers must be a list")
    lease = _load_json(lease_path, "lease") if lease_path is not None and lease_path.exists() else None
    return evidence, result, lease


def plot_evidence(
    ev: LeaseEvidence,
    result: dict[str, Any] | None,
    lease: dict[str, Any] | None,
    out: Path,
    profile_store: ProfileStore | None,
    *,
    attack: str | None = None,
    registry: Registry | None = None,
) -> Path:
    """Title, profile and memory floor from what the files say, then `plot_run`."""
    model_id = (lease or {}).get("model_id") or (result or {}).get("model_id") or ""
    agent = (lease or {}).get("agent_id") or (result or {}).get("agent_id") or "?"
    job = ((lease or {}).get("job") or {}).get("kind", "")
    if attack is None:
        attack = agent if agent in {a.name for a in CATALOGUE} else None
    profile = None
    if profile_store is not None and model_id and job != "embed":
        try:
            profile = profile_store.get(model_id, ev.profile_key)
        except (OSError, ValueError, TypeError):
            profile = None
    floor = _memory_floor(result, profile, model_id, (lease or {}).get("precision", "fp32"), registry)
    parts = [f"agent {agent}", f"attack {attack}" if attack else "no attack", model_id or "model ?"]
    return plot_run(ev, result, profile, out, " / ".join(parts), memory_floor_mb=floor, job=job)


def _memory_floor(
    result: dict[str, Any] | None, profile: Profile | None, model_id: str, precision: str, registry
) -> float | None:
    """L1's memory floor: as the verifier reported it, else from the profile and the weights' size."""
    for layer in (result or {}).get("layers", []):
        floor = (layer.get("details") or {}).get("rss_floor_mb")
        if isinstance(floor, int | float):
            return float(floor)
    if profile is None or registry is None or not model_id:
        return None
    try:
        return memory_floor_mb(profile, registry.reference(model_id).param_count, precision)
    except Exception:  # unknown or unbuildable model here: draw no floor rather than fail
        return None


def plot_demo_dir(
    run_dir: Path,
    profile_store: ProfileStore | None,
    *,
    attack: str | None = None,
    registry: Registry | None = None,
) -> Path:
    """Read a `poi demo` run folder (evidence.json, result.json, lease.json) and write trace.png in it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    result_path = run_dir / "result.json"
    evidence, result, lease = trace_inputs(
        run_dir / "evidence.json", result_path if result_path.exists() else None, run_dir / "lease.json"
    )
    return plot_evidence(
        evidence, result, lease, run_dir / "trace.png", profile_store, attack=attack, registry=registry
    )
