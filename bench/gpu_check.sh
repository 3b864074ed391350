#!/usr/bin/env bash
# One-GPU check of lmforge's scale-out path (one H200/H100; ~8-12 minutes, ~32 GB of free disk for load8b):
#   1. a ~1.1B Llama-shaped model, FSDP2 bf16 + torch.compile, 40 steps: tokens/s and MFU vs 989.4 TFLOP/s
#   2. one (+1) training step of the full llama2-7b preset built by sharded init (meta -> FSDP2 ->
#      local shards initialized), FSDP2 on one GPU, full activation checkpointing: peak memory beside
#      `lmforge plan`'s prediction
#   3. load8b: an 8B model dir (llama3-8b, fp32, ~32 GB on disk under $OUT/model8b, removed afterwards
#      unless KEEP_MODEL=1) written, then loaded in a fresh process through the sharded path
#      (safetensors get_slice per rank): time, host/GPU peak, logits equal to the written model
#   4. the CUDA-only tests in tests/gpu/ (if pytest is installed)
# Results: $OUT (default bench/out): throughput.json, memory7b.json, write8b.json, load8b.json,
# gpu_check.log, summary.txt.
# Needs only torch (CUDA build) and lmforge's dependencies; runs from a fresh clone without installing
# (PYTHONPATH points at the checkout). Each part has its own timeout; a failed part does not stop the rest.
#
#   bash bench/gpu_check.sh                # all parts
#   PARTS="throughput memory7b" bash bench/gpu_check.sh
#   SMOKE=1 bash bench/gpu_check.sh        # CPU, tiny model: checks the script itself
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/bench/out}"
PARTS="${PARTS:-throughput memory7b load8b tests}"
SMOKE_FLAG=""
if [[ "${SMOKE:-0}" == "1" ]]; then SMOKE_FLAG="--smoke"; fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say() { echo "$*" | tee -a "$LOG"; }

"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import torch, platform
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
PYEOF
"$PY" -c "import lmforge, yaml, numpy, safetensors" 2>>"$LOG" || { say "error: lmforge's dependencies are missing (pip install -e . --no-deps needs pyyaml numpy safetensors)"; exit 2; }
if [[ -z "$SMOKE_FLAG" ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "error: CUDA is not available (SMOKE=1 checks the script on CPU)"; exit 2
fi

status=0
run_part() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  say "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=30 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    say "== $name FAILED (exit $rc after $((SECONDS - t0))s; $( [[ $rc -eq 124 ]] && echo timed out || echo see $LOG ))"
    tail -n 25 "$LOG" | sed 's/^/   | /'
    status=1
  else
    say "== $name ok ($((SECONDS - t0))s)"
  fi
}

for part in $PARTS; do
  case "$part" in
    throughput) run_part throughput 420 "$PY" bench/gpu_check.py throughput --out "$OUT" $SMOKE_FLAG ;;
    memory7b)   run_part memory7b 360 "$PY" bench/gpu_check.py memory7b --out "$OUT" $SMOKE_FLAG ;;
    load8b)
      rm -f "$OUT/write8b.json" "$OUT/load8b.json"
      run_part write8b 420 "$PY" bench/gpu_check.py write8b --out "$OUT" $SMOKE_FLAG
      if [[ -f "$OUT/write8b.json" ]]; then
        run_part load8b 300 "$PY" bench/gpu_check.py load8b --out "$OUT" $SMOKE_FLAG
      fi
      if [[ "${KEEP_MODEL:-0}" != "1" ]]; then rm -rf "$OUT/model8b"; fi ;;
    tests)
      if [[ -n "$SMOKE_FLAG" ]]; then say "== tests skipped (SMOKE: they need CUDA)"; continue; fi
      if "$PY" -c "import pytest" 2>/dev/null; then
        run_part gpu-tests 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/gpu
      else
        say "== gpu-tests skipped (pytest not installed)"
      fi ;;
    *) say "error: unknown part '$part' (throughput, memory7b, load8b, tests)"; status=1 ;;
  esac
done

"$PY" bench/gpu_check.py summary --out "$OUT" | tee "$OUT/summary.txt" | tee -a "$LOG"
exit $status
