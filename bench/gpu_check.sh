#!/usr/bin/env bash
# One-GPU check of lmforge (docs/gpu.md): fits a 15-minute device lease on one H100 (default parts <= 8
# minutes of timeouts, PARTS=all <= 10). Each part runs in its own process under its own timeout and writes
# its JSON to $OUT as it finishes; a failed part does not stop the rest, a failed probe stops everything.
#   probe       (<= 40 s) CUDA visible, 1-rank NCCL all_reduce, the version-sensitive torch calls
#               (DTensor _foreach_div_, distribute_tensor(src_data_rank=None), FlexAttention), bf16 matmul rate
#   throughput  (100 s) ~1.1B model, FSDP2 bf16 + torch.compile: tokens/s and MFU
#   memory      (90 s) the largest model `lmforge plan` says fits this GPU for a full fine-tune (7B/8B on
#               an H200, OpenLLaMA-3B's shape on an H100): peak memory beside the planner's prediction
#   load8b      (80 + 50 s) llama3-8b written as a bf16 model dir (~16 GB under $OUT/model8b, removed after
#               unless KEEP_MODEL=1), loaded in a fresh process through the sharded path into DTensors
#   tests       (120 s) the CUDA tests in tests/gpu/ (if pytest is installed)
#   planner     (PARTS=all only, 100 s) bench/gpu_planner_check.py: measured vs planned memory, row by row
#   ckpt1b      (only when named: PARTS="ckpt1b", 300 s) bench/checkpoint_stall.py on the ~1.1B shape: training
#               stall per checkpoint, synchronous vs checkpoint.async (a ~13 GB checkpoint with AdamW state,
#               written under $OUT/ckpt_stall and removed), and the hash cost read back vs while writing
# Results: $OUT (default bench/out): probe.json, throughput.json, memory.json, write8b.json, load8b.json,
# gpu_planner_check.json, checkpoint_stall.json, gpu_check.log, summary.txt.
# Needs only torch (a CUDA build), numpy, pyyaml, safetensors (pytest for the tests part): never run `make`
# or pip on the device. Runs from the checkout without installing (PYTHONPATH points at it).
#
#   bash bench/gpu_check.sh                       # probe + throughput memory load8b tests
#   PARTS=all bash bench/gpu_check.sh             # ... + planner
#   PARTS="memory" bash bench/gpu_check.sh        # the probe always runs first
#   SMOKE=1 bash bench/gpu_check.sh               # CPU, gloo, tiny shapes: checks the script itself
#   SMOKE=1 DEVICE_ONLY=1 bash bench/gpu_check.sh # ... with every package the device lacks blocked
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/bench/out}"
DEFAULT_PARTS="throughput memory load8b tests"
PARTS="${PARTS:-$DEFAULT_PARTS}"
if [[ "$PARTS" == "all" ]]; then PARTS="$DEFAULT_PARTS planner"; fi
SMOKE_FLAG=""
if [[ "${SMOKE:-0}" == "1" ]]; then SMOKE_FLAG="--smoke"; fi
mkdir -p "$OUT"
rm -f "$OUT"/{probe,throughput,memory,write8b,load8b,gpu_planner_check,checkpoint_stall}.json
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${DEVICE_ONLY:-0}" == "1" ]]; then  # only what the GPU machines have (bench/device_only/sitecustomize.py)
  export PYTHONPATH="$ROOT/bench/device_only:$PYTHONPATH"
  export LMFORGE_BLOCKED_LOG="${LMFORGE_BLOCKED_LOG:-$OUT/blocked_imports.txt}"
  : > "$LMFORGE_BLOCKED_LOG"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say() { echo "$*" | tee -a "$LOG"; }

"$PY" -c "import lmforge, torch, yaml, numpy, safetensors" 2>>"$LOG" \
  || { say "error: lmforge's device dependencies are missing (torch, numpy, pyyaml, safetensors); see $LOG"; exit 2; }
if [[ -z "$SMOKE_FLAG" ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "error: CUDA is not available (SMOKE=1 checks the script on CPU)"; exit 2
fi

status=0
run_part() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  say "== $name (timeout ${limit}s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    say "== $name FAILED (exit $rc after $((SECONDS - t0))s; $( [[ $rc -eq 124 || $rc -eq 137 ]] && echo timed out || echo "see $LOG" ))"
    tail -n 15 "$LOG" | sed 's/^/   | /'
    status=1
  else
    say "== $name ok ($((SECONDS - t0))s)"
  fi
  return $rc
}

if ! run_part probe 40 "$PY" bench/gpu_check.py probe --out "$OUT" $SMOKE_FLAG; then
  say "gpu_check: the probe failed, nothing else was run: $(grep -h '^probe FAILED' "$LOG" | tail -1)"
  "$PY" bench/gpu_check.py summary --out "$OUT" | tee "$OUT/summary.txt" | tee -a "$LOG"
  exit 3
fi

for part in $PARTS; do
  case "$part" in
    throughput) run_part throughput 100 "$PY" bench/gpu_check.py throughput --out "$OUT" $SMOKE_FLAG || true ;;
    memory|memory7b) run_part memory 90 "$PY" bench/gpu_check.py memory --out "$OUT" $SMOKE_FLAG || true ;;
    load8b)
      if run_part write8b 80 "$PY" bench/gpu_check.py write8b --out "$OUT" $SMOKE_FLAG; then
        run_part load8b 50 "$PY" bench/gpu_check.py load8b --out "$OUT" $SMOKE_FLAG || true
      fi
      if [[ "${KEEP_MODEL:-0}" != "1" ]]; then rm -rf "$OUT/model8b"; fi ;;
    tests)
      if "$PY" -c "import pytest" 2>/dev/null; then  # without CUDA (SMOKE) they are collected and skipped
        run_part gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/gpu || true
      else
        say "== gpu-tests skipped (pytest not installed)"
      fi ;;
    planner) run_part planner 100 "$PY" bench/gpu_planner_check.py --out "$OUT" $SMOKE_FLAG || true ;;
    ckpt1b)
      run_part ckpt1b 300 "$PY" bench/checkpoint_stall.py --device cuda --shape tinyllama --seq 1024 --batch 1 \
        --saves 2 --every 4 --rounds 1 --hash-repeats 1 --dir "$OUT/ckpt_stall" \
        --json "$OUT/checkpoint_stall.json" $SMOKE_FLAG || true
      rm -rf "$OUT/ckpt_stall" ;;
    *) say "error: unknown part '$part' (throughput, memory, load8b, tests, planner, ckpt1b, or PARTS=all)"; status=1 ;;
  esac
done

"$PY" bench/gpu_check.py summary --out "$OUT" | tee "$OUT/summary.txt" | tee -a "$LOG"
if [[ -n "${LMFORGE_BLOCKED_LOG:-}" && -s "$LMFORGE_BLOCKED_LOG" ]]; then
  say "imports the device lacks that were looked for (and done without): $(sort -u "$LMFORGE_BLOCKED_LOG" | tr '\n' ' ')"
fi
exit $status
