#!/usr/bin/env bash
# The GPU session in three commands, each fitting one 10-minute device command (one H100/H200, no
# internet, no pip index), with .whl/ carried from `bash bench/gpu/prepare_wheels.sh`:
#
#   POI_COMMIT=<sha> bash bench/gpu/run_all.sh core     # ~4 min: wheels, environment, cross_hardware
#   POI_COMMIT=<sha> bash bench/gpu/run_all.sh traces   # ~7 min: wheels, collect_traces (budget 520 s)
#   POI_COMMIT=<sha> bash bench/gpu/run_all.sh next     # <= 8 min: wheels, next_run (7B audit speed-up,
#                                                       # bf16 decode replay, L3 on GPU traces,
#                                                       # capacity challenge), then
#                                                       # collect_traces --plan serving
#
# (no argument means core; -h prints this). The device's copy of the tree has no .git: pass the
# commit, POI_COMMIT=$(git rev-parse HEAD), in the command. Each part writes into $OUT as it goes,
# flat, at most 5 files (only 8 come back, 16 MiB each):
#
#   core:    $OUT/env.txt          nvidia-smi, driver, kernel, versions, what imports
#            $OUT/gpu_core.json    bench/gpu/cross_hardware.py: audit speed-up FIRST (the main GPU
#                                  figure), then acceptance, then the cheats; rewritten atomically
#                                  after every trial, so a timeout or a crash keeps what was measured
#            $OUT/cross_hardware.log
#            $OUT/run_all.log      this script's own log and the summary
#   traces:  $OUT/env.txt
#            $OUT/traces.tar.gz    bench/gpu/collect_traces.py: every trace + index.json (<= 15 MiB),
#            $OUT/traces_index.json  re-packed after every window, and a copy of the index
#            $OUT/collect_traces.log
#            $OUT/run_all.log
#   next:    $OUT/env.txt
#            $OUT/gpu_next.json    bench/gpu/next_run.py: audit7b, native_replay, exact_gpu, capacity
#                                  (in that order, each with its sub-budget), rewritten after every
#                                  trial
#            $OUT/next_run.log
#            $OUT/serving_traces.tar.gz, $OUT/serving_traces_index.json   collect_traces --plan serving
#            $OUT/collect_traces.log
#            $OUT/run_all.log      (7 files)
#
# Budgets (seconds from the start of this script; the device kills a command at 600): install and
# environment ~30; core: cross_hardware under `timeout` of min(XH_TIMEOUT=480, what is left - 45),
# no trial started in its last 40; traces: collect_traces --budget-s min(POI_TRACES_BUDGET_S=520,
# what is left - 45), killed 15 s after. collect_traces degrades by dropping the last round's
# repetitions, never whole workloads; cross_hardware by skipping its last trials (listed).
# next: the whole part ends by POI_NEXT_BUDGET_S=480 s from the start: next_run.py gets
# --budget-s min(POI_NEXT_MAIN_S=280, what is left of 480 - 120) under `timeout` +20 s (its own
# sub-budgets: audit7b 150, native_replay 45, exact_gpu 40, capacity 30); collect_traces --plan
# serving gets what is left of the 480 s less 15 (killed 15 s after), so it ends by ~480 s.
#
# Rehearsal without a GPU (the current environment, no install, CPU smoke runs):
#   POI_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/run_all_smoke bash bench/gpu/run_all.sh core
#   POI_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/run_all_smoke bash bench/gpu/run_all.sh traces
#   POI_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/next_smoke bash bench/gpu/run_all.sh next
set -uo pipefail

usage() {
  cat <<'EOF'
usage: [POI_COMMIT=<sha>] [OUT=<dir>] bash bench/gpu/run_all.sh [core|traces]
       [POI_COMMIT=<sha>] [OUT=<dir>] bash bench/gpu/run_all.sh next

  core    install .whl/, record the environment, run bench/gpu/cross_hardware.py
          (audit speed-up first, then acceptance and cheats)       -> $OUT/gpu_core.json
  traces  install .whl/, run bench/gpu/collect_traces.py with a time budget
                                                                    -> $OUT/traces.tar.gz
  next    install .whl/, run bench/gpu/next_run.py (7B audit speed-up, bf16 decode replay,
          L3 on GPU traces, capacity challenge), then collect_traces.py --plan serving; <= 480 s
                                                   -> $OUT/gpu_next.json, serving_traces.tar.gz
  (no argument: core). Each part fits one 10-minute device command.

environment: POI_COMMIT (the project commit; the device copy has no .git), OUT (default ./gpu-out),
  PYTHON (default python3), POI_SMOKE=1 (CPU smoke rehearsal, no install), XH_TIMEOUT (core, 480),
  POI_TRACES_BUDGET_S (traces, 520), POI_CMD_LIMIT_S (the device's per-command limit, 600),
  POI_NEXT_BUDGET_S (next: the whole part, 480), POI_NEXT_MAIN_S (next: next_run.py, 280),
  POI_NEXT_WINDOW_S (next: trace window, 6; smoke 1)
EOF
}

if [ $# -gt 1 ]; then
  echo "run_all.sh: one part at a time, got: $*" >&2
  usage >&2
  exit 2
fi
PART=${1:-core}
case "$PART" in
  core | traces | next) ;;
  -h | --help | help)
    usage
    exit 0
    ;;
  *)
    echo "run_all.sh: unknown part '$PART'" >&2
    usage >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/../.." || exit 2
START=$(date +%s)
LIMIT=${POI_CMD_LIMIT_S:-600}
XH_TIMEOUT=${XH_TIMEOUT:-480}
TRACES_BUDGET=${POI_TRACES_BUDGET_S:-520}
NEXT_BUDGET=${POI_NEXT_BUDGET_S:-480}
NEXT_MAIN=${POI_NEXT_MAIN_S:-280}
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
SITE=/tmp/site
COMMIT=${POI_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no POI_COMMIT given, no .git)")}
SMOKE=()
[ -n "${POI_SMOKE:-}" ] && SMOKE=(--device cpu --quick)
mkdir -p "$OUT"
: >"$OUT/run_all.log"

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((LIMIT - $(elapsed))); }
log() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$OUT/run_all.log" >&2; }
min() { echo $(($1 < $2 ? $1 : $2)); }

log "run_all.sh $PART; commit $COMMIT"
case "$COMMIT" in unknown*) log "!! no commit recorded: pass POI_COMMIT=\$(git rev-parse HEAD) in the command" ;; esac

# ---- 1. wheels ------------------------------------------------------------------------------
rm -rf "$SITE"
if [ -n "${POI_SMOKE:-}" ]; then
  log "POI_SMOKE: no install, CPU smoke runs (NOT GPU results)"
elif ! ls .whl/*.whl >/dev/null 2>&1; then
  log "!! no .whl/*.whl here: was .whl carried? (bash bench/gpu/prepare_wheels.sh, carry .whl)"
elif "$PY" -m pip --version >/dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl 2>&1 | grep -v "Running pip as the 'root' user" | tee -a "$OUT/run_all.log"
else
  log "no pip: unpacking the wheels with zipfile"
  "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
    "$SITE" .whl/*.whl
fi
export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
[ -d .whl/tokenizer ] && export POI_TOKENIZER=$PWD/.whl/tokenizer
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export POI_HOME=${POI_HOME:-/tmp/poi-home} POI_COMMIT=$COMMIT

if [ -z "${POI_SMOKE:-}" ] &&
  ! "$PY" -c "from in_toto_attestation.v1.statement import Statement" 2>>"$OUT/run_all.log"; then
  log "the machine's protobuf cannot load the in-toto statement: using .whl/fallback (protobuf)"
  "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
    /tmp/site-fallback .whl/fallback/*.whl
  export PYTHONPATH=/tmp/site-fallback:$PYTHONPATH
fi
if "$PY" -c "import maxwell_poi" 2>>"$OUT/run_all.log"; then
  log "import maxwell_poi: ok"
else
  log "!! import maxwell_poi FAILED (see above); collect_traces still runs on the telemetry package alone"
fi

# ---- 2. environment -------------------------------------------------------------------------
{
  echo "# run_all.sh $PART environment, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  echo "## commit: $COMMIT"
  echo "## kernel: $(uname -r) ($(uname -v))"
  echo "## virtualisation: $(systemd-detect-virt 2>/dev/null || echo 'systemd-detect-virt: n/a')" \
    "dmi: $(cat /sys/class/dmi/id/product_name 2>/dev/null || echo n/a)"
  echo "## nvidia-smi"
  timeout 20 nvidia-smi 2>&1
  if [ "$PART" != traces ]; then
    echo "## nvidia-smi -q -d POWER,CLOCK,PERFORMANCE"
    timeout 20 nvidia-smi -q -d POWER,CLOCK,PERFORMANCE 2>&1 | head -120
  fi
  echo "## python"
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version(), platform.machine(), "kernel", platform.release())
for name in ["torch", "triton", "transformers", "numpy", "pynvml", "psutil", "google.protobuf", "pydantic",
             "pydantic_core", "cryptography", "securesystemslib", "blake3", "pymerkle", "typing_extensions"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:18} {getattr(m, '__version__', getattr(m, 'VERSION', '?'))}  {m.__file__}")
    except Exception as e:
        print(f"{name:18} NOT IMPORTABLE: {type(e).__name__}: {e}")
import torch
print("cuda runtime", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32,
      "fp32 matmul precision", torch.get_float32_matmul_precision(),
      "sdpa flash/mem-eff/math", torch.backends.cuda.flash_sdp_enabled(),
      torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
try:
    import pynvml
    pynvml.nvmlInit()
    cv = pynvml.nvmlSystemGetCudaDriverVersion()
    print("driver", pynvml.nvmlSystemGetDriverVersion(), "driver CUDA", f"{cv // 1000}.{cv % 1000 // 10}")
except Exception as e:
    print("nvml:", type(e).__name__, e)
EOF
  echo "## lscpu"
  lscpu 2>&1 | head -20
  free -g 2>&1
} >"$OUT/env.txt" 2>&1
log "wrote $OUT/env.txt"

# ---- 3. the part ----------------------------------------------------------------------------
if [ "$PART" = core ]; then
  t=$(min "$XH_TIMEOUT" $(($(left) - 45)))
  if [ "$t" -lt 60 ]; then
    log "!! only $(left)s left: cross_hardware.py not started"
  else
    log "cross_hardware.py (timeout ${t}s, no trial started after $((t - 40))s)"
    timeout -k 10 "$t" "$PY" bench/gpu/cross_hardware.py "${SMOKE[@]}" --commit "$COMMIT" \
      --budget-s $((t - 40)) --out "$OUT/gpu_core.json" 2>&1 | tee "$OUT/cross_hardware.log"
    rc=${PIPESTATUS[0]}
    log "cross_hardware.py exit $rc$([ "$rc" = 124 ] && echo ' (TIMED OUT: gpu_core.json holds every trial finished before)')"
  fi
elif [ "$PART" = next ]; then
  # what is left of the part's budget (NEXT_BUDGET from START, and the device's LIMIT less 45 s)
  next_left() { min $((NEXT_BUDGET - $(elapsed))) $(($(left) - 45)); }
  QUICK=()
  WINDOW=${POI_NEXT_WINDOW_S:-6}
  [ -n "${POI_SMOKE:-}" ] && QUICK=(--reps 1) && WINDOW=${POI_NEXT_WINDOW_S:-1}
  mb=$(min "$NEXT_MAIN" $(($(next_left) - 120)))
  if [ "$mb" -lt 30 ]; then
    log "!! only $(next_left)s left of the part: next_run.py not started"
  else
    log "next_run.py (budget ${mb}s, killed at $((mb + 20))s)"
    timeout -k 10 $((mb + 20)) "$PY" bench/gpu/next_run.py "${SMOKE[@]}" --commit "$COMMIT" \
      --budget-s "$mb" --out "$OUT/gpu_next.json" 2>&1 | tee "$OUT/next_run.log"
    rc=${PIPESTATUS[0]}
    log "next_run.py exit $rc$([ "$rc" = 124 ] && echo ' (TIMED OUT: gpu_next.json holds every trial finished before)')"
  fi
  tb=$(($(next_left) - 15))
  if [ "$tb" -lt 30 ]; then
    log "!! only $(next_left)s left of the part: collect_traces.py --plan serving not started"
  else
    log "collect_traces.py --plan serving (budget ${tb}s)"
    timeout -k 10 $((tb + 15)) "$PY" bench/gpu/collect_traces.py "${SMOKE[@]}" "${QUICK[@]}" --plan serving \
      --seconds "$WINDOW" --commit "$COMMIT" --out /tmp/poi-serving-traces \
      --pack "$OUT/serving_traces.tar.gz" --budget-s "$tb" 2>&1 | tee "$OUT/collect_traces.log"
    rc=${PIPESTATUS[0]}
    log "collect_traces.py --plan serving exit $rc"
  fi
else
  tb=$(min "$TRACES_BUDGET" $(($(left) - 45)))
  if [ "$tb" -lt 60 ]; then
    log "!! only $(left)s left: collect_traces.py not started"
  else
    log "collect_traces.py (budget ${tb}s)"
    timeout -k 10 $((tb + 15)) "$PY" bench/gpu/collect_traces.py "${SMOKE[@]}" --commit "$COMMIT" \
      --out /tmp/poi-traces --pack "$OUT/traces.tar.gz" --budget-s "$tb" 2>&1 | tee "$OUT/collect_traces.log"
    rc=${PIPESTATUS[0]}
    log "collect_traces.py exit $rc"
  fi
fi

# ---- 4. what comes back -------------------------------------------------------------------------
log "done in $(elapsed)s; results:"
ls -l "$OUT" | tee -a "$OUT/run_all.log"
timeout 30 "$PY" - "$OUT" "$PART" <<'EOF' 2>&1 | tee -a "$OUT/run_all.log"
import json, sys
from pathlib import Path
out, part = Path(sys.argv[1]), sys.argv[2]
if part == "core":
    try:
        d = json.loads((out / "gpu_core.json").read_text())
        print("card:", d.get("card"), "| commit:", d.get("commit"), "| complete:", d.get("complete"))
        print("sections:", d.get("sections"))
        print("speedup:", {k: v.get("audit_speedup") for k, v in d.get("speedup", {}).items()})
        print("acceptance:", {k: f"{v['affirmed']}/{v['trials']}" for k, v in d.get("acceptance", {}).items()})
        print("cheats caught:", {k: f"{v['caught']}/{v['trials']}" for k, v in d.get("cheats_on_gpu", {}).items()})
        for e in d.get("errors", []):
            print("  ERROR", e.get("section"), e.get("trial"), e.get("error"))
        for s in d.get("skipped", []):
            print("  SKIPPED", s)
    except Exception as e:
        print("gpu_core.json:", type(e).__name__, e)
elif part == "next":
    try:
        d = json.loads((out / "gpu_next.json").read_text())
        print("card:", d.get("card"), "| commit:", d.get("commit"), "| complete:", d.get("complete"),
              "| wall", d.get("wall_s"))
        print("sections:", d.get("sections"))
        for name, c in d.get("audit7b", {}).get("cells", {}).items():
            print(f"  audit7b {name}: tokens {c.get('tokens')} generate {c.get('generate_s')} graphed "
                  f"{c.get('graphed_generate_s')} audit {c.get('audit_s')} speedup {c.get('audit_speedup')} "
                  f"per lease {c.get('audit_speedup_per_lease')} graphed {c.get('graphed_audit_speedup')} "
                  f"{[v['verdict'] for v in c.get('verdicts', [])]}")
        for name, c in d.get("exact_gpu", {}).get("cells", {}).items():
            print(f"  exact_gpu {name}: {c.get('verdict')} worst {c.get('worst_residual')} "
                  f"caught {c.get('caught')} {c.get('reason', '')[:100]}")
        c = d.get("capacity", {})
        print(f"  capacity: {c.get('count')} x {c.get('n')}^2 bf16 = {c.get('matrices_bytes')} B, passes "
              f"{c.get('pass_s')} digests equal {c.get('digests_equal')} pcie {c.get('pcie')} "
              f"derived {c.get('derived')}")
        for e in d.get("errors", []):
            print("  ERROR", e.get("section"), e.get("trial"), e.get("error"))
        for s in d.get("skipped", []):
            print("  SKIPPED", s)
    except Exception as e:
        print("gpu_next.json:", type(e).__name__, e)
    try:
        d = json.loads((out / "serving_traces_index.json").read_text())
        print(f"serving traces: {len(d['recordings'])} recordings, {len(d['skipped'])} skipped, "
              f"{len(d['errors'])} errors, wall {d.get('wall_s')} s, packed {d.get('packed_bytes')} B")
        for r in d["recordings"]:
            s = next(iter(r["summary"].values()))
            print(f"  {r['key']:34} r{r['rep']} P={s.get('power_w_mean')} W tensor={s.get('tensor_util_mean')} "
                  f"dram={s.get('dram_bw_util_mean')} tok/s={r['work'].get('tokens_per_s')} "
                  f"J/TFLOP={r['work'].get('j_per_tflop_est')}")
        for e in d["errors"]:
            print("  ERROR", e.get("key"), e.get("rep"), e.get("error"))
    except Exception as e:
        print("serving_traces_index.json:", type(e).__name__, e)
else:
    try:
        d = json.loads((out / "traces_index.json").read_text())
        print(f"traces: {len(d['recordings'])} recordings, {len(d['skipped'])} skipped, "
              f"{len(d['errors'])} errors, complete={d['complete']}, wall {d.get('wall_s')} s, "
              f"packed {d.get('packed_bytes')} B, commit {d.get('commit')}")
        for r in d["recordings"]:
            s = next(iter(r["summary"].values()))
            print(f"  {r['key']:24} r{r['rep']} P={s.get('power_w_mean')} W E={s.get('energy_j')} J "
                  f"tensor={s.get('tensor_util_mean')} int={s.get('int_util_mean')} "
                  f"dram={s.get('dram_bw_util_mean')} hz={s.get('achieved_hz')} "
                  f"J/TFLOP={r['work'].get('j_per_tflop_est')}")
        for e in d["errors"]:
            print("  ERROR", e.get("key"), e.get("rep"), e.get("error"))
    except Exception as e:
        print("traces_index.json:", type(e).__name__, e)
EOF
