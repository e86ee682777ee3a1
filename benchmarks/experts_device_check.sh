#!/bin/bash
# One device session for the CUDA experts kernels: build, tests, sanitizers, benchmark.
# Usage (on the GPU machine, repo root): OUT=<dir> bash benchmarks/experts_device_check.sh [bench args...]
# Knobs: SKIP_BUILD, SKIP_TESTS, PYTEST_K / PYTEST_FILES / PYTEST_TIMEOUT, SANITIZE=1 with SAN_K,
# BENCH_ANYWAY=1 (benchmark even after a test failure).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  start=$(date +%s)
  MOEQUANT_CUDA_ARCHS=90a MAX_JOBS=16 python setup.py build_ext --inplace --build-temp /tmp/moequant_build > "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
if [ -n "${GDB_TEST:-}" ]; then
  timeout 240 cuda-gdb -batch -ex "set pagination off" -ex run -ex "bt 30" --args python -m pytest tests/test_experts_cuda.py \
    -x -q -p no:cacheprovider -k "$GDB_TEST" > "$OUT/gdb.log" 2>&1; echo "gdb rc=$?"; grep -E "^#|SIG" "$OUT/gdb.log" | head -40
fi
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${PYTEST_TIMEOUT:-300}" python -m pytest ${PYTEST_FILES:-tests/test_experts_cuda.py} -q -k "${PYTEST_K:-not nothing}" \
    --maxfail=30 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  rc=$?; echo "pytest rc=$rc"; tail -25 "$OUT/pytest.log"
  # Benchmarks of kernels that fail their tests are not worth the device time.
  [ "$rc" = 0 ] || [ "${BENCH_ANYWAY:-0}" = 1 ] || { cp moequant/_C*.so "$OUT/" 2>/dev/null; exit 0; }
fi
if [ "${SANITIZE:-0}" = "1" ]; then
  for tool in memcheck racecheck; do
    MOEQUANT_DECODE_MAX_PAIRS=${SAN_DECODE:-64} timeout 200 compute-sanitizer --tool $tool --print-limit 20 \
      python -m pytest tests/test_experts_cuda.py -q -x -p no:cacheprovider \
      -k "${SAN_K:-test_int32_index or test_all_pairs or test_blocksize_32 or (test_token_counts and 5) or test_row_sliced_scratch and bfloat16-False}" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
  done
fi
if [ "$#" -gt 0 ]; then
  python benchmarks/bench_experts.py "$@" --out "$OUT/bench_experts.json" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
fi
cp moequant/_C*.so "$OUT/" 2>/dev/null
exit 0
