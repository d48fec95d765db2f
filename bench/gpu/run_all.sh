#!/usr/bin/env bash
# The ONE command to run on the lent GPU machine (one H100/H200, no internet, no pip index), with
# .whl/ carried from `bash bench/gpu/prepare_wheels.sh`:
#
#   bash bench/gpu/run_all.sh           # OUT=<folder that comes back>; ~8.5 min in all
#
# 1. installs .whl/*.whl into /tmp/site (PYTHONPATH=/tmp/site:src; the tree itself is the package)
# 2. $OUT/env.txt            nvidia-smi, driver, versions, what imports
# 3. $OUT/gpu_core.json      bench/gpu/cross_hardware.py (log: $OUT/cross_hardware.log)
# 4. $OUT/traces.tar.gz      bench/gpu/collect_traces.py, every trace + index.json in one file,
#    $OUT/traces_index.json  and a copy of the index (log: $OUT/collect_traces.log)
# 5. $OUT/run_all.log        this script's own log
#
# Seven files at most, flat, because only a few files come back from $OUT. Each step runs under
# `timeout` and a failure does not stop the next. The trace collection gets whatever is left of the
# whole budget (POI_GPU_BUDGET_S, default 500 s) after the cross-hardware check (XH_TIMEOUT, 270 s),
# and degrades by dropping the last repetitions, never whole workloads.
#
# Rehearsal without a GPU (uses the current environment, no install, CPU smoke runs):
#   POI_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/run_all_smoke bash bench/gpu/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/../.."

START=$(date +%s)
BUDGET=${POI_GPU_BUDGET_S:-500}
XH_TIMEOUT=${XH_TIMEOUT:-270}
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
SITE=/tmp/site
SMOKE=()
[ -n "${POI_SMOKE:-}" ] && SMOKE=(--device cpu --quick)
mkdir -p "$OUT"
: >"$OUT/run_all.log"

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$OUT/run_all.log" >&2; }

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
export POI_TOKENIZER=$PWD/.whl/tokenizer HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export POI_HOME=/tmp/poi-home TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "from in_toto_attestation.v1.statement import Statement" 2>>"$OUT/run_all.log"; then
  log "the machine's protobuf cannot load the in-toto statement: using .whl/fallback (protobuf)"
  "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
    /tmp/site-fallback .whl/fallback/*.whl
  export PYTHONPATH=/tmp/site-fallback:$PYTHONPATH
fi
if "$PY" -c "import maxwell_poi" 2>>"$OUT/run_all.log"; then
  log "import maxwell_poi: ok"
else
  log "!! import maxwell_poi FAILED (see above); collect_traces still runs on the telemetry module alone"
fi

# ---- 2. environment -------------------------------------------------------------------------
{
  echo "# run_all.sh environment, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  echo "## git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git in this copy')"
  echo "## nvidia-smi"
  nvidia-smi 2>&1
  echo "## nvidia-smi -q -d POWER,CLOCK,PERFORMANCE"
  timeout 20 nvidia-smi -q -d POWER,CLOCK,PERFORMANCE 2>&1 | head -120
  echo "## python"
  "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version(), platform.machine())
for name in ["torch", "transformers", "numpy", "pynvml", "psutil", "google.protobuf", "pydantic",
             "pydantic_core", "cryptography", "securesystemslib", "blake3", "pymerkle", "typing_extensions"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:18} {getattr(m, '__version__', getattr(m, 'VERSION', '?'))}  {m.__file__}")
    except Exception as e:
        print(f"{name:18} NOT IMPORTABLE: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import pynvml
    pynvml.nvmlInit()
    print("driver", pynvml.nvmlSystemGetDriverVersion())
except Exception as e:
    print("nvml:", type(e).__name__, e)
EOF
  echo "## lscpu"
  lscpu 2>&1 | head -20
  free -g 2>&1
} >"$OUT/env.txt" 2>&1
log "wrote $OUT/env.txt"

# ---- 3. cross-hardware acceptance and GPU audit speed ----------------------------------------
log "cross_hardware.py (timeout ${XH_TIMEOUT}s)"
timeout -k 10 "$XH_TIMEOUT" "$PY" bench/gpu/cross_hardware.py "${SMOKE[@]}" --out "$OUT/gpu_core.json" 2>&1 |
  tee "$OUT/cross_hardware.log"
rc=${PIPESTATUS[0]}
log "cross_hardware.py exit $rc$([ "$rc" = 124 ] && echo ' (TIMED OUT: it writes only at the end)')"

# ---- 4. telemetry traces ----------------------------------------------------------------------
left=$((BUDGET - $(elapsed) - 20))
tb=$((left < 330 ? left : 330))
if [ "$tb" -ge 60 ]; then
  log "collect_traces.py (budget ${tb}s)"
  timeout -k 10 $((tb + 40)) "$PY" bench/gpu/collect_traces.py --out /tmp/poi-traces \
    --pack "$OUT/traces.tar.gz" --budget-s "$tb" "${SMOKE[@]}" 2>&1 | tee "$OUT/collect_traces.log"
  rc=${PIPESTATUS[0]}
  log "collect_traces.py exit $rc"
else
  log "!! only ${left}s left of ${BUDGET}s: collect_traces.py skipped"
fi

# ---- 5. what comes back -------------------------------------------------------------------------
log "done in $(elapsed)s; results:"
ls -l "$OUT" | tee -a "$OUT/run_all.log"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/run_all.log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    d = json.loads((out / "gpu_core.json").read_text())
    print("card:", d.get("card"))
    print("acceptance:", {k: f"{v['affirmed']}/{v['trials']}" for k, v in d["acceptance"].items()})
    print("cheats caught:", {k: f"{v['caught']}/{v['trials']}" for k, v in d["cheats_on_gpu"].items()})
    print("speedup:", {k: v.get("audit_speedup_256_gpu") for k, v in d["speedup"].items()})
except Exception as e:
    print("gpu_core.json:", type(e).__name__, e)
try:
    d = json.loads((out / "traces_index.json").read_text())
    print(f"traces: {len(d['recordings'])} recordings, {len(d['skipped'])} skipped, "
          f"{len(d['errors'])} errors, complete={d['complete']}, wall {d.get('wall_s')} s")
    for r in d["recordings"]:
        s = next(iter(r["summary"].values()))
        print(f"  {r['key']:24} r{r['rep']} P={s.get('power_w_mean')} W E={s.get('energy_j')} J "
              f"tensor={s.get('tensor_util_mean')} int={s.get('int_util_mean')} hz={s.get('achieved_hz')}")
    for e in d["errors"]:
        print("  ERROR", e)
except Exception as e:
    print("traces_index.json:", type(e).__name__, e)
EOF
