#!/usr/bin/env bash
# One-shot GPU check (about 9-14 minutes on one GPU; see Env below): writes a markdown report of
#   1. training throughput of parcae-140m/370m/770m/1.3b and gpt-140m at the paper's micro-batch, 10 bf16 steps
#      each, eager and torch.compile: tokens/s, MFU (explicit peak), peak memory, fits or not
#      (benchmarks/gpu_throughput.py);
#   2. per-sequence looping (ours) vs max-depth masking (official) on the GPU (benchmarks/loop_cost.py);
#   3. cached generation tokens/s (benchmarks/generate.py, when that script exists);
#   4. decode tokens/s of parcae-140m (random weights, fp32, fixed depth 8, greedy, batch 1 and 8): today's engine
#      (commit ec2adf8), the eager engine and the compiled one (Engine(compile=True): on CUDA its graphs are
#      captured, torch.compile mode "reduce-overhead"), compile time apart (benchmarks/decode_speed.py --device cuda);
#   5. depth-level batching on parcae-140m (benchmarks/depth_batching.py --device cuda, when that script exists);
#   6. the compiled engine's exit-rule modes (segments / graph / eager) against compiled fixed depth on parcae-140m
#      with forced depths (benchmarks/compiled_exit.py --device cuda, when that script exists).
#
#   bash benchmarks/gpu_check.sh                       # report: benchmarks/results/gpu_check_<date>.md
#   PEAK_TFLOPS=989.4 bash benchmarks/gpu_check.sh out.md
#
# Env: PYTHON (default: python), PEAK_TFLOPS (default: auto = Lightning's table, else a datasheet figure for
# H100/H200), BUDGET_S (seconds for part 1, default 270), DECODE_S / DEPTH_S / EXITMODE_S (limits of parts 4, 5
# and 6, default 240 / 120 / 120; worst case 270 + 45 + 75 + 60 + 240 + 120 + 120 s plus start-up, about 16
# minutes; BUDGET_S=150 EXITMODE_S=90 keeps it under 14). Without a CUDA GPU it exits with status 2 and a message.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LITDATA_DISABLE_VERSION_CHECK=1 PYTHONUNBUFFERED=1
OUT=${1:-benchmarks/results/gpu_check_$(date -u +%Y%m%d_%H%M).md}
mkdir -p "$(dirname "$OUT")"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing measured." >&2
  exit 2
fi
WORK=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"   # cold compiles: the compile times are part of what we see
START=$(date +%s)

{
  echo "# GPU check ($(date -u +%Y-%m-%d\ %H:%M\ UTC))"
  echo
  "$PY" - <<'PYEOF'
import platform, torch, lightning
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible; CUDA {torch.version.cuda}; "
      f"torch {torch.__version__}; lightning {lightning.__version__}; Python {platform.python_version()}")
PYEOF
  echo
  echo "## Training throughput (bf16 autocast, paper micro-batch, 10 timed steps after 3 warm-up steps)"
  echo
} > "$OUT"

echo "[gpu_check] 1/5 training throughput (budget ${BUDGET_S:-270} s) ..."
timeout $(( ${BUDGET_S:-270} + 45 )) "$PY" benchmarks/gpu_throughput.py --steps 10 --warmup 3 \
    --peak_tflops "${PEAK_TFLOPS:-auto}" --budget_s "${BUDGET_S:-270}" \
    --out_md "$WORK/throughput.md" --out_json "${OUT%.md}.json"
rc=$?
if [ -s "$WORK/throughput.md" ]; then cat "$WORK/throughput.md" >> "$OUT"; else
  echo "gpu_throughput.py stopped (exit $rc) before writing its table; see the console output." >> "$OUT"; fi

echo "[gpu_check] 2/5 per-sequence loop vs max-depth masking ..."
{
  echo
  echo "## Per-sequence looping vs max-depth masking (benchmarks/loop_cost.py, bf16, d 1024, batch 16 x 2048)"
  echo
  echo '```'
  timeout 75 "$PY" benchmarks/loop_cost.py --device cuda --bf16 --batch 16 --seq_len 2048 --d_model 1024 --steps 4 2>&1 \
    | grep -v -i warning | tail -n 8
  echo "(exit ${PIPESTATUS[0]})"
  echo '```'
} >> "$OUT"

echo "[gpu_check] 3/5 cached generation ..."
{
  echo
  echo "## Cached generation"
  echo
  if [ -f benchmarks/generate.py ] && ! "$PY" benchmarks/generate.py --help 2>/dev/null | grep -q -- "--device"; then
    echo "Skipped: benchmarks/generate.py has no --device flag (it measures on the CPU); parts 4-5 measure the GPU."
  elif [ -f benchmarks/generate.py ]; then
    echo '```'
    timeout 60 "$PY" benchmarks/generate.py --device cuda 2>&1 | grep -v -i warning | tail -n 15
    echo "(exit ${PIPESTATUS[0]}; command: $PY benchmarks/generate.py --device cuda)"
    echo '```'
  else
    echo "Skipped: benchmarks/generate.py does not exist in this checkout (the generation benchmark comes with the"
    echo "inference engine)."
  fi
} >> "$OUT"

echo "[gpu_check] 4/6 decode speed of parcae-140m: today / eager / compiled (graph-captured) ..."
{
  echo
  echo "## Decode tokens/s, parcae-140m, fixed depth 8 (benchmarks/decode_speed.py --device cuda)"
  echo
  echo '```'
  timeout "${DECODE_S:-240}" "$PY" benchmarks/decode_speed.py --device cuda --models parcae-140m \
      --preset_new_tokens 64 --rounds 3 --out "${OUT%.md}_decode_speed.json" 2>&1 \
    | grep -v -i warning | grep -v "^\[decode_speed\]" | tail -n 12
  echo "(exit ${PIPESTATUS[0]}; raw rows: ${OUT%.md}_decode_speed.json; warm-up s includes the compile and the graph capture)"
  echo '```'
} >> "$OUT"

echo "[gpu_check] 5/6 depth-level batching ..."
{
  echo
  echo "## Depth-level batching (benchmarks/depth_batching.py --device cuda)"
  echo
  if [ -f benchmarks/depth_batching.py ] && ! "$PY" benchmarks/depth_batching.py --help 2>/dev/null | grep -q -- "--device"; then
    echo "Skipped: benchmarks/depth_batching.py has no --device flag in this checkout."
  elif [ -f benchmarks/depth_batching.py ]; then
    echo '```'
    timeout "${DEPTH_S:-120}" "$PY" benchmarks/depth_batching.py --device cuda 2>&1 | grep -v -i warning | tail -n 20
    echo "(exit ${PIPESTATUS[0]}; command: $PY benchmarks/depth_batching.py --device cuda)"
    echo '```'
  else
    echo "Skipped: benchmarks/depth_batching.py does not exist in this checkout (it comes with issue 28's"
    echo "depth-level scheduler)."
  fi
} >> "$OUT"

echo "[gpu_check] 6/6 the compiled engine's exit-rule modes ..."
{
  echo
  echo "## Compiled exit-rule modes, parcae-140m, forced depths (benchmarks/compiled_exit.py --device cuda)"
  echo
  if [ -f benchmarks/compiled_exit.py ]; then
    echo '```'
    timeout "${EXITMODE_S:-120}" "$PY" benchmarks/compiled_exit.py --device cuda --new_tokens 32 --repeats 2 \
        --out "${OUT%.md}_compiled_exit.json" 2>&1 | grep -v -i warning | grep -v "^\[compile" | tail -n 14
    echo "(exit ${PIPESTATUS[0]}; raw rows: ${OUT%.md}_compiled_exit.json)"
    echo '```'
  else
    echo "Skipped: benchmarks/compiled_exit.py does not exist in this checkout."
  fi
  echo
  echo "Total wall time of the check: $(( $(date +%s) - START )) s."
} >> "$OUT"
rm -rf "$WORK"
echo "[gpu_check] report written to $OUT"
