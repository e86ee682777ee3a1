#!/usr/bin/env bash
# Sets up this machine and runs every test: the Python suite (CPU; CUDA tests run when a GPU is
# present and skip otherwise), the GoogleTest suite (through tests/test_cpp.py) and the demo's
# smoke test. Idempotent: what is already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: keep an installed one (e.g. a CUDA build); otherwise the pinned CPU build. Never let pip
# resolve an unpinned torch (it would download a multi-GB CUDA build).
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -r tests/requirements.txt
# bitsandbytes' CPU path is the bit-exactness oracle; --no-deps keeps it from touching torch.
$PY -m pip install -q --no-deps bitsandbytes==0.50.2 || {
  [ -n "${CI:-}" ] && exit 1
  echo "warning: bitsandbytes unavailable; bit-exactness tests against it will skip" >&2
}
# GoogleTest and CMake for tests/cpp.
if ! [ -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake ] && ! [ -f /usr/lib/aarch64-linux-gnu/cmake/GTest/GTestConfig.cmake ] \
   || ! command -v cmake >/dev/null; then
  apt-get update -qq && apt-get install -y -qq libgtest-dev cmake >/dev/null
fi

MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e .
$PY -m pytest tests -q -rs "$@"
