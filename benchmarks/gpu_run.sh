#!/usr/bin/env bash
# One prepared GPU run, most valuable answers first, inside a wall-clock limit (default 540 s).
#
#   PYTHONPATH=. bash benchmarks/gpu_run.sh
#
# Run from the repository root of a copied tree on a CUDA machine (no network needed: nothing
# is installed; the CUDA extension JIT-builds through rnnreg_kernels.cuda on first use).  A
# GPU lease is one command of at most 10 minutes on a machine that takes minutes to start, so
# the phases run in this order, each with its own time limit, and every result is written to
# $OUT as soon as it exists:
#   1. persistent-kernel correctness at the benchmark shapes (pytest, per-test timeout: a grid
#      barrier that never opens is reported by name instead of eating the run), and contract v2
#      (normprop, cell norms, norm gradients) in bf16, which the CPU interpreter cannot run
#   2. profile --measure at the key shapes (measured us/step beside the static estimate)
#   3. the key benchmark rows: LSTM and IRNN H=1024 B=32 T=100, bf16 and fp16, training step
#      and forward, all three penalties, ours vs nn.LSTM/nn.RNN + eager post-hoc, same run
#   4. the rest of the GPU tests (other variants, dtypes, the cuda backend incl. its JIT build)
#   5. more benchmark sets with what is left ($BENCH_SETS, default word,char)
# Environment knobs (all optional):
#   OUT          output folder (default /tmp/rnnreg_gpu_out), flat (no subfolders)
#   TIME_LIMIT   seconds for the whole call (default 540)
#   TEST_TIMEOUT seconds per test (default 90)
#   BENCH_SETS   sets for phase 5 (default word,char); BENCH_EXTRA: more harness options
#   SKIP         comma-separated phases to skip, e.g. SKIP=4,5
# Files in $OUT: env.txt, 1_tests_key.log, 2_profile_<cell>.json/.txt, 3_bench_key.log and its
# JSON, auto_wins.json (auto's measured table from phase 3), 4_tests_rest.log, 5_bench.log and
# its JSON, RESULTS.md, summary.txt.
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/rnnreg_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TIME_LIMIT=${TIME_LIMIT:-540}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
PY=${PYTHON:-python}
SKIP=",${SKIP:-},"
left() { echo $(( TIME_LIMIT - ($(date +%s) - START) )); }
say() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
skip() { case "$SKIP" in *",$1,"*) return 0 ;; esac; return 1; }
# run LIMIT CMD...: at most LIMIT seconds, never past the overall limit (keeps 20 s spare)
run() {
  local lim=$1; shift
  local l; l=$(( $(left) - 20 ))
  [ "$l" -lt "$lim" ] && lim=$l
  if [ "$lim" -lt 15 ]; then say "skipped (no time left): $*"; return 124; fi
  timeout -k 10 "$lim" "$@"
}
HAS_TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo 1 || echo 0)
PYTEST_T=()
[ "$HAS_TIMEOUT" = "1" ] && PYTEST_T=(-p pytest_timeout --timeout "$TEST_TIMEOUT")

{
  echo "gpu_run.sh $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "sms", torch.cuda.get_device_properties(0).multi_processor_count
      if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF
  echo "pytest-timeout: $HAS_TIMEOUT"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

KEY_TESTS="tests/test_triton_gpu.py::test_persistent_at_large_hidden \
tests/test_triton_gpu.py::test_auto_variant_matches_reference \
tests/test_triton_gpu.py::test_contract_v2_bf16"
if ! skip 1; then
  say "1. persistent kernels at the benchmark shapes"
  # shellcheck disable=SC2086
  run 170 $PY -m pytest -m gpu $KEY_TESTS -q -rfE -p no:cacheprovider "${PYTEST_T[@]}" \
    -k "bf16 or fp16 or large_hidden" > "$OUT/1_tests_key.log" 2>&1
  say "tests exit status $? (124 = phase time limit); $(tail -n 1 "$OUT/1_tests_key.log")"
fi

if ! skip 2; then
  for cell in lstm relu; do
    say "2. profile --measure $cell H=1024 B=32 bf16"
    run 60 $PY -m rnnreg_kernels profile --backend triton --cell $cell --hidden 1024 \
      --batch 32 --dtype bf16 --measure --json "$OUT/2_profile_$cell.json" \
      > "$OUT/2_profile_$cell.txt" 2>&1
    say "profile exit status $?"; tail -n 4 "$OUT/2_profile_$cell.txt"
  done
fi

if ! skip 3; then
  say "3. key benchmark rows (bf16, fp16; train and forward)"
  B3=$(( $(left) - 200 )); [ "$B3" -gt 150 ] && B3=150
  run $(( B3 + 40 )) $PY benchmarks/run.py --set key --device cuda --out "$OUT" \
    --name 3_bench_key --time-budget "$B3" --no-progress > "$OUT/3_bench_key.log" 2>&1
  say "bench exit status $? (1 = a contender was wrong or crashed)"
  tail -n 12 "$OUT/3_bench_key.log"
  # auto's measured table from these rows (commit it as rnnreg_kernels/auto_wins.json with the
  # JSON: python -m rnnreg_kernels.bench.auto_table --from <the committed JSON> --write)
  [ -f "$OUT/3_bench_key.json" ] && run 30 $PY -m rnnreg_kernels.bench.auto_table \
    --from "$OUT/3_bench_key.json" --out "$OUT/auto_wins.json" 2>&1 | tee -a "$OUT/summary.txt"
fi

if ! skip 4; then
  say "4. the other GPU tests (variants, dtypes, cuda backend)"
  run 150 $PY -m pytest -m gpu tests/ -q -rfE -p no:cacheprovider "${PYTEST_T[@]}" \
    --deselect tests/test_triton_gpu.py::test_persistent_at_large_hidden \
    > "$OUT/4_tests_rest.log" 2>&1
  say "tests exit status $?; $(tail -n 1 "$OUT/4_tests_rest.log")"
fi

if ! skip 5; then
  B5=$(( $(left) - 60 ))
  if [ "$B5" -ge 30 ]; then
    say "5. bench ${BENCH_SETS:-word,char} (budget ${B5}s)"
    # shellcheck disable=SC2086
    run $(( B5 + 30 )) $PY benchmarks/run.py --set "${BENCH_SETS:-word,char}" --device cuda \
      --out "$OUT" --name 5_bench --time-budget "$B5" --no-progress ${BENCH_EXTRA:-} \
      > "$OUT/5_bench.log" 2>&1
    say "bench exit status $?"
  fi
fi

run 30 $PY benchmarks/report.py "$OUT" --md "$OUT/RESULTS.md" --summary 2>&1 | tail -n 30
say "done; files in $OUT"

# 6. (lowest priority, only with time left) the opt-in Hopper cluster variant of the cuda
#    backend: its GPU tests (cluster forward and backward vs the float64 reference,
#    determinism, agreement with the persistent kernels) and its measured profile at relu
#    H=1024 B=32 bf16.  Needs sm_90; it reuses
#    the extension that phase 4 built.
if ! skip 6; then
  say "6. cuda cluster variant (RNNREG_CUDA_VARIANT=cluster)"
  run 60 $PY -m pytest -m gpu tests/test_cuda_cluster_gpu.py -q -rfE -p no:cacheprovider \
    "${PYTEST_T[@]}" > "$OUT/6_cluster_tests.log" 2>&1
  say "cluster tests exit status $?; $(tail -n 1 "$OUT/6_cluster_tests.log")"
  run 45 $PY -m rnnreg_kernels profile --backend cuda --variant cluster --cell relu \
    --hidden 1024 --batch 32 --dtype bf16 --measure --json "$OUT/6_profile_cluster_relu.json" \
    > "$OUT/6_profile_cluster_relu.txt" 2>&1
  say "cluster profile exit status $?"
fi
say "done (phase 6)"
