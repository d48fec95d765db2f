"""The report's figures: matplotlib PNGs drawn at build time from bench/results/*.json (through
`Numbers.val`, so every value read is recorded with its file and key). One function per figure; each
returns the figure or None when its soft result file is missing (the caption then says so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .results import Numbers

WIDTH = 6.6  # inches: the text width of an A4 page with the report's margins


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 8,
            "axes.titlesize": 8.5,
            "axes.labelsize": 8,
            "legend.fontsize": 7,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "figure.dpi": 150,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def ezkl(n: Numbers, data_dir: Path) -> Any:
    """EZKL setup / prove / verify time and peak memory by width, attention and MLP block halves, from
    zk.json when present, beside the earlier default-settings baseline recorded in anchors.md
    (docs/report/data/ezkl_baseline.yaml, cited in the caption); the baseline alone without zk.json."""
    plt = _plt()
    widths = [16, 64, 128, 384]
    base = yaml.safe_load((data_dir / "ezkl_baseline.yaml").read_text())["rows"]
    by_d = {row["d"]: row for row in base}
    runs: dict[str, dict[str, list[float | None]]] = {}  # label -> what -> value per width
    if n.has("zk"):
        for kind, prefix in (("attention", "ezkl"), ("MLP", "ezkl_mlp")):
            runs[kind] = {
                what: [
                    n.val("zk", f"{prefix}_d{d}_{what}") if n.exists("zk", f"{prefix}_d{d}_{what}") else None
                    for d in widths
                ]
                for what in ("setup_s", "prove_s", "verify_s", "peak_gb")
            }
    runs["attention, earlier baseline"] = {
        what: [by_d.get(d, {}).get(what) for d in widths]
        for what in ("setup_s", "prove_s", "verify_s", "peak_gb")
    }
    colours = {"attention": "#2a6fb0", "MLP": "#d07a1f", "attention, earlier baseline": "#999999"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(WIDTH, 2.5))
    for label, series in runs.items():
        c = colours[label]
        ls = "--" if "baseline" in label else "-"
        for what, marker in (("setup_s", "o"), ("prove_s", "s"), ("verify_s", "^")):
            pts = [(d, v) for d, v in zip(widths, series[what], strict=True) if v is not None]
            if pts:
                a.plot(*zip(*pts, strict=True), marker=marker, ls=ls, c=c, ms=3.5, lw=1)
    handles = [
        plt.Line2D([], [], c=c, ls="--" if "baseline" in k else "-") for k, c in colours.items() if k in runs
    ]
    handles += [plt.Line2D([], [], c="k", marker=m, ls="none", ms=3.5) for m in "os^"]
    labels = [k for k in colours if k in runs] + ["setup", "prove", "verify"]
    a.legend(handles, labels, fontsize=6, ncol=2, loc="upper left")
    a.set(
        xscale="log",
        yscale="log",
        xlabel="model width d",
        ylabel="seconds (2-core CPU)",
        title="EZKL time by width",
    )
    a.set_xticks(widths, [str(w) for w in widths])
    a.xaxis.set_minor_formatter(plt.NullFormatter())
    a.set_ylim(top=a.get_ylim()[1] * 30)  # room for the legend
    step = 0.8 / len(runs)
    for i, (label, series) in enumerate(runs.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * step for j, v in enumerate(series["peak_gb"]) if v is not None]
        ys = [v for v in series["peak_gb"] if v is not None]
        b.bar(xs, ys, width=step, color=colours[label], label=label)
    b.set_xticks(range(len(widths)), [str(w) for w in widths])
    b.set(xlabel="model width d", ylabel="peak memory (GB)", title="prover peak memory")
    b.legend(fontsize=6)
    fig.tight_layout()
    return fig


def freivalds_width(n: Numbers) -> Any:
    if not n.has("exact", "freivalds_vs_recompute_by_width"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH / 2, 2.3))
    ticks: set[int] = set()
    for key, label, style in (
        ("freivalds_vs_recompute_by_width", "GPT-2 block", "o-"),
        ("freivalds_vs_recompute_by_width_llama", "Llama block", "s-"),
    ):
        if not n.has("exact", key):
            continue
        by = n.val("exact", key)
        ws = sorted(by, key=int)
        ticks |= {int(w) for w in ws}
        ax.plot([int(w) for w in ws], [by[w] for w in ws], style, ms=3.5, label=label)
    ax.axhline(0.1, ls="--", c="grey", lw=0.8, label="design goal")
    ax.set(
        yscale="log",
        xlabel="block width d",
        ylabel="check / recompute one block",
        title="L3 check cost vs recomputation",
    )
    # a linear width axis: on a log axis the ticks of 1536 and 2048 ran into each other and the
    # minor-tick labels of the log formatter were drawn over them
    ax.set_xticks(sorted(ticks), [str(w) for w in sorted(ticks)])
    ax.set_xlim(0, max(ticks) * 1.08)
    ax.set_yticks([0.03, 0.1, 0.3], ["0.03", "0.1", "0.3"])
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def detection_k(n: Numbers) -> Any:
    if not n.has("exact", "detection_after_k"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH / 2, 2.3))
    kmax = 1
    for key, label, c in (
        ("detection_after_k", "GPT-2-small", "#2a6fb0"),
        ("llama_detection_after_k", "llama-small", "#d07a1f"),
    ):
        if not n.exists("exact", key):
            continue
        det = n.val("exact", key)
        ks = sorted(det["after_k"], key=int)
        blocks = det["blocks"]
        kmax = max(kmax, int(ks[-1]))
        ax.plot(
            [int(k) for k in ks],
            [det["after_k"][k] for k in ks],
            "o",
            c=c,
            ms=3.5,
            label=f"{label}, B={blocks}",
        )
        kk = list(range(1, int(ks[-1]) + 1))
        ax.plot(kk, [1 - (1 - 1 / blocks) ** k for k in kk], "-", c=c, lw=0.8, alpha=0.7)
    ax.set(
        xlabel="challenges k (one block opened each)",
        ylabel="P(caught)",
        title="one wrong block of B",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


PEER_ATTACKS = [
    "other-weights",
    "smaller-model",
    "skipped-layers",
    "noise-1%",
    "noise-0.1%",
    "bf16-downgrade",
    "int8-downgrade",
    "cheap-draft",
    "one-token-changed",
    "mid-stream-switch",
]
PEER_METHODS = {
    "toploc": "TOPLOC",
    "logprob_rank": "logprob-rank",
    "difr": "DiFR",
    "maxwell_l4": "L4 cross-class",
}


def peers(n: Numbers) -> Any:
    plt = _plt()
    import numpy as np

    rows = [[n.val("peers", f"methods/{m}/attacks/{a}/rate") for a in PEER_ATTACKS] for m in PEER_METHODS]
    honest = [n.val("peers", f"methods/{m}/honest_fp32/rate") for m in PEER_METHODS]
    grid = np.array([[*r, 1 - h] for r, h in zip(rows, honest, strict=True)])  # green = good
    fig, ax = plt.subplots(figsize=(WIDTH, 1.9))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    labels = [*PEER_ATTACKS, "honest rejected"]
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(PEER_METHODS)), list(PEER_METHODS.values()))
    for i, row in enumerate(rows):
        for j, v in enumerate([*row, honest[i]]):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5)
    ax.set_title("fraction caught (last column: honest fp32 runs rejected), poi-lm, same generations")
    ax.spines[:].set_visible(False)
    fig.tight_layout()
    return fig


def confusion(n: Numbers) -> Any:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.6))
    for ax, key, title in (
        (axes[0], "workload_classifier", "workload (held out)"),
        (axes[1], "model_identification", "claimed model (held out)"),
    ):
        cm = n.val("signals", f"{key}/confusion_matrix")
        labels = n.val("signals", f"{key}/labels")
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(
                    j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > 1 else "black"
                )
        ax.set(
            xlabel="predicted",
            ylabel="true",
            title=f"{title}: accuracy {n.val('signals', key + '/accuracy'):.2f}",
        )
        ax.spines[:].set_visible(False)
    fig.tight_layout()
    return fig


def calibration(n: Numbers) -> Any:
    plt = _plt()
    runs = n.val("calibration", "runs/generate")
    thr = n.val("calibration", "thresholds/fp32/min_close")
    same = n.val("calibration", "same_class_thresholds/fp32/min_close")
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.4), sharey=True)
    for ax, model in zip(axes, ("gpt2-small", "poi-lm"), strict=True):
        mine = [r for r in runs if r["model"] == model and r["precision"] == "fp32"]
        variants = sorted({r["variant"] for r in mine}, key=lambda v: (not v.startswith("honest"), v))
        for i, v in enumerate(variants):
            ys = [r["worst_close"] for r in mine if r["variant"] == v]
            honest = v.startswith("honest")
            ax.scatter([i] * len(ys), ys, s=10, c="#2a7" if honest else "#c43", marker="o" if honest else "x")
        ax.axhline(thr, ls="--", c="grey", lw=0.8)
        ax.axhline(same, ls=":", c="black", lw=0.8)
        ax.set_xticks(
            range(len(variants)), [v.replace("honest-", "h:") for v in variants], rotation=40, ha="right"
        )
        ax.set(title=f"{model}: worst fingerprint chunk per run", ylim=(-0.03, 1.03))
    axes[0].set_ylabel("fraction of top-k values close")
    fig.tight_layout()
    return fig


def floor(n: Numbers) -> Any:
    plt = _plt()
    pairs = n.val("detection_floor", "floor")
    levels = n.val("detection_floor", "levels")
    fig, ax = plt.subplots(figsize=(WIDTH / 2, 2.3))
    for pair, style in zip(pairs, ("o-", "s--"), strict=False):
        for check, c in (("l4", None), ("token_choice", "grey")):
            rates = n.val("detection_floor", f"floor/{pair}/{check}/perturbation_rates")
            label = f"{'same' if pair.startswith('cpu') else 'cross'}-class {check.replace('_', ' ')}"
            ax.plot(
                [x * 100 for x in levels],
                [rates[str(x)] for x in levels],
                style,
                label=label,
                color=c,
                alpha=0.6 if c else 1,
            )
    ax.set(
        xscale="log",
        xlabel="weight noise (%)",
        ylabel="fraction of leases caught",
        ylim=(-0.03, 1.03),
        title="L4 detection floor (poi-lm)",
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def deterrence(n: Numbers) -> Any:
    """Audit probability the inequality asks for, and what it costs, against the stake."""
    plt = _plt()
    import numpy as np

    speedup = n.val("core", "generation/audit_speedup")
    margin = 0.5
    ratio = np.linspace(0.5, 20, 200)  # stake / reward
    fig, (a, b) = plt.subplots(1, 2, figsize=(WIDTH, 2.3))
    for saved in (0.25, 0.5, 0.9):
        p = np.minimum(1, (1 + margin) * saved / (1 + ratio))
        a.plot(ratio, p, label=f"cheat saves {saved:.0%} of R")
        b.plot(ratio, 100 * p / speedup, label=f"saves {saved:.0%}")
    a.set(
        xlabel="stake S / reward R",
        ylabel="audit probability p",
        title="p = 1.5·C/(R+S), r = 0",
        yscale="log",
    )
    b.set(
        xlabel="stake S / reward R",
        ylabel="audit compute, % of generation",
        title=f"p / audit speed-up ({speedup:.1f}×, CPU)",
        yscale="log",
    )
    a.legend()
    fig.tight_layout()
    return fig


def overheads(n: Numbers) -> Any:
    """What each verification step costs relative to the inference it checks (log scale)."""
    plt = _plt()
    items = [
        (
            "prover instrumentation (A-E receipt)",
            n.val("core", "generation/prover_overhead_attributed/ratio"),
        ),
        ("Observer sampling, CPU share", n.val("signals", "sampling_overhead_cpu_fraction")),
        ("L4 audit / generation", 1 / n.val("core", "generation/audit_speedup")),
        (
            "TOPLOC verify / generation",
            n.val("peers", "methods/toploc/verifier_cost/ratio_to_honest_generation"),
        ),
    ]
    if n.has("exact", "trace_overhead_ratio"):
        items.append(("L3 trace recording (extra)", n.val("exact", "trace_overhead_ratio") - 1))
        items.append(("L3 all blocks / generation", n.val("exact", "exact_audit_vs_generation/gpt2-small")))
    items.append(
        ("gateway, 32 tokens streamed (extra)", n.val("gateway", "gateway_overhead_ratio/streamed_32") - 1)
    )
    if n.has("zk", "prove_to_native/attn_d384"):
        items.append(
            ("EZKL prove / native, attention d=384 (zk.json)", n.val("zk", "prove_to_native/attn_d384"))
        )
    items = [(k, v) for k, v in items if v]
    fig, ax = plt.subplots(figsize=(WIDTH, 0.28 * len(items) + 0.7))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#58a")
    ax.set(xscale="log", xlabel="cost relative to the inference it checks (CPU, log scale)")
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v * 1.1, i, f"{v:.3g}", va="center", fontsize=6.5)
    fig.tight_layout()
    return fig


FIGURES = {
    "ezkl": ezkl,
    "freivalds_width": freivalds_width,
    "detection_k": detection_k,
    "peers": peers,
    "confusion": confusion,
    "calibration": calibration,
    "floor": floor,
    "deterrence": deterrence,
    "overheads": overheads,
}
