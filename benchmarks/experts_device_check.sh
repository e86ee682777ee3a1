#!/bin/bash
# One device session for the CUDA experts kernels: build, tests, sanitizers, benchmark.
# Usage (on the GPU machine, repo root): OUT=<dir> bash benchmarks/experts_device_check.sh [bench args...]
# Knobs: SKIP_BUILD, SKIP_TESTS, PYTEST_K / PYTEST_FILES / PYTEST_TIMEOUT, SANITIZE=1 with SAN_K,
# BENCH_ANYWAY=1 (benchmark even after a test failure), NF4_BENCH="nf4 fp4 int8 nf4_dq fp4_dq"
# (bench_nf4.py once per format, NF4_BENCH_ARGS passed to each; JSON bench_nf4-<format>.json packed
# into $OUT/bench_nf4.tgz: the device tool returns at most 8 files), BENCH_TIMEOUT (seconds for
# bench_experts.py), KEEP_SO=1 (copy the built extension to $OUT), SAN_TOOLS / SAN_TIMEOUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$OUT/build.log"
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  start=$(date +%s)
  MOEQUANT_CUDA_ARCHS=90a MAX_JOBS=16 python setup.py build_ext --inplace --build-temp /tmp/moequant_build >> "$OUT/build.log" 2>&1 \
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
  [ "$rc" = 0 ] || [ "${BENCH_ANYWAY:-0}" = 1 ] || exit 0
fi
if [ "${SANITIZE:-0}" = "1" ]; then
  for tool in ${SAN_TOOLS:-memcheck racecheck}; do
    MOEQUANT_DECODE_MAX_PAIRS=${SAN_DECODE:-64} timeout "${SAN_TIMEOUT:-200}" compute-sanitizer --tool $tool --print-limit 20 \
      python -m pytest tests/test_experts_cuda.py -q -x -p no:cacheprovider \
      -k "${SAN_K:-test_int32_index or test_all_pairs or test_blocksize_32 or (test_token_counts and 5) or test_row_sliced_scratch and bfloat16-False}" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
  done
fi
if [ -n "${NF4_BENCH:-}" ]; then
  mkdir -p /tmp/bench_nf4
  for fmt in $NF4_BENCH; do
    qt=${fmt%_dq}; dq=""; [ "$qt" != "$fmt" ] && dq="--double-quant"
    timeout 120 python benchmarks/bench_nf4.py --quant-type "$qt" $dq ${NF4_BENCH_ARGS:-} \
      --out "/tmp/bench_nf4/bench_nf4-$fmt.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench_nf4.log" | tail -2
  done
  tar czf "$OUT/bench_nf4.tgz" -C /tmp/bench_nf4 .
fi
if [ "$#" -gt 0 ]; then
  timeout "${BENCH_TIMEOUT:-3600}" python benchmarks/bench_experts.py "$@" --out "$OUT/bench_experts.json" 2>&1 \
    | grep -v Warning | tee "$OUT/bench.log"
fi
[ "${KEEP_SO:-0}" = 1 ] && cp moequant/_C*.so "$OUT/" 2>/dev/null
exit 0
