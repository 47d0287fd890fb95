#!/usr/bin/env bash
# GPU tests + GPU benchmark sets in one call, within a wall-clock limit (default 560 s).
#
#   PYTHONPATH=. bash benchmarks/gpu_run.sh [SETS]
#
# Run from the repository root of a copied tree on a CUDA machine (no network needed: nothing
# is installed; the CUDA extension JIT-builds through rnnreg_kernels.cuda on first use).
# SETS: comma-separated shape sets (default: $BENCH_SETS or "flashrnn-point,word,char").
# A full pass over every GPU set does not fit one 10-minute call; split it, e.g.
#   bash benchmarks/gpu_run.sh                                        # tests + first sets
#   RUN_TESTS=0 bash benchmarks/gpu_run.sh small-batch
#   RUN_TESTS=0 bash benchmarks/gpu_run.sh large-batch,irnn,hidden-sweep
# Environment knobs (all optional):
#   OUT            output folder (default /tmp/rnnreg_gpu_out); at most 7 files, no subfolders
#   RUN_TESTS      1 (default) runs `python -m pytest -m gpu tests/` first; 0 skips it
#   TEST_LIMIT     seconds for the tests (default 200)
#   TIME_LIMIT     seconds for the whole call (default 560)
#   BENCH_DTYPES   e.g. fp32,bf16 (default: every dtype of the sets: fp32,bf16,fp16)
#   BENCH_MODES    forward,train (default both)
#   BENCH_CONTENDERS  eager,compile,ours (default all three)
#   BENCH_BACKENDS triton,cuda (default) or e.g. triton,cuda,reference
#   BENCH_REPS     timed calls per contender (default: the set's, 10)
#   BENCH_SHAPES   only shapes whose name contains this substring
#   BENCH_TF32     1: allow TF32 for fp32 on both sides (default 0: strict fp32)
#   BENCH_EXTRA    more options for the harness, verbatim
# Files written to $OUT: env.txt, tests.log, bench.log, <device>_<date>_<sets>.json,
# RESULTS.md, speedup_vs_batch.png, speedup_vs_hidden.png (the plots only when a sweep exists).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/rnnreg_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SETS=${1:-${BENCH_SETS:-flashrnn-point,word,char}}
TIME_LIMIT=${TIME_LIMIT:-560}
PY=${PYTHON:-python}
left() { echo $(( TIME_LIMIT - ($(date +%s) - START) )); }

{
  echo "== $(date -u +%FT%TZ) gpu_run.sh sets=$SETS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY - <<'EOF' 2>&1
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF
} > "$OUT/env.txt"

if [ "${RUN_TESTS:-1}" = "1" ]; then
  LIMIT=${TEST_LIMIT:-200}
  echo "== tests (limit ${LIMIT}s)"
  timeout -k 10 "$LIMIT" $PY -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1
  rc=$?
  echo "tests exit status $rc (124 = time limit)" | tee -a "$OUT/tests.log"
  tail -n 3 "$OUT/tests.log"
fi

# The CUDA extension JIT-builds on its first call; make that call here (a tiny recurrence) so
# the build time is logged apart and never lands inside a benchmark case.
echo "== cuda extension" | tee -a "$OUT/env.txt"
timeout -k 10 "$(( $(left) > 300 ? 240 : 60 ))" $PY - >> "$OUT/env.txt" 2>&1 <<'EOF'
import time
import torch
t = time.time()
try:
    from rnnreg_kernels import Penalties, recurrence
    x = torch.randn(3, 2, 32, device="cuda")
    w = torch.randn(32, 8, device="cuda")
    h = torch.zeros(2, 8, device="cuda")
    recurrence(x, w, h, h.clone(), cell="lstm", penalties=Penalties(), backend="cuda")
    torch.cuda.synchronize()
    print(f"cuda backend: available (first call {time.time() - t:.0f} s)")
except Exception as e:  # report, never stop the run
    print(f"cuda backend: unavailable after {time.time() - t:.0f} s: {type(e).__name__}: "
          f"{str(e)[:400]}")
EOF
tail -n 1 "$OUT/env.txt"

BUDGET=$(( $(left) - 75 ))
if [ "$BUDGET" -lt 30 ]; then
  echo "no time left for the benchmark (${BUDGET}s)"; exit 1
fi
ARGS=(--set "$SETS" --device cuda --out "$OUT" --time-budget "$BUDGET" --no-progress)
[ -n "${BENCH_DTYPES:-}" ] && ARGS+=(--dtypes "$BENCH_DTYPES")
[ -n "${BENCH_MODES:-}" ] && ARGS+=(--modes "$BENCH_MODES")
[ -n "${BENCH_CONTENDERS:-}" ] && ARGS+=(--contenders "$BENCH_CONTENDERS")
[ -n "${BENCH_BACKENDS:-}" ] && ARGS+=(--backends "$BENCH_BACKENDS")
[ -n "${BENCH_REPS:-}" ] && ARGS+=(--reps "$BENCH_REPS")
[ -n "${BENCH_SHAPES:-}" ] && ARGS+=(--shapes "$BENCH_SHAPES")
[ "${BENCH_TF32:-0}" = "1" ] && ARGS+=(--tf32)
# shellcheck disable=SC2206
[ -n "${BENCH_EXTRA:-}" ] && ARGS+=(${BENCH_EXTRA})
echo "== bench (budget ${BUDGET}s): ${ARGS[*]}"
timeout -k 10 "$(( BUDGET + 60 ))" $PY benchmarks/run.py "${ARGS[@]}" > "$OUT/bench.log" 2>&1
echo "bench exit status $? (1 = a contender was wrong or crashed; 124 = time limit)"
grep -E '^\[[0-9]+/[0-9]+\]' "$OUT/bench.log" | tail -n 3

$PY benchmarks/report.py "$OUT" --md "$OUT/RESULTS.md" --summary 2>&1 | tail -n 60
echo "== done in $(( $(date +%s) - START ))s; files in $OUT"
