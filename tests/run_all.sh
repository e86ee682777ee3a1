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
$PY -m pip install -q -r tests/requirements.txt || {
  [ -n "${CI:-}" ] && exit 1
  echo "warning: could not install tests/requirements.txt (offline?); using what is installed" >&2
}
# bitsandbytes' CPU path is the bit-exactness oracle; --no-deps keeps it from touching torch.
$PY -m pip install -q --no-deps bitsandbytes==0.50.2 || {
  [ -n "${CI:-}" ] && exit 1
  echo "warning: bitsandbytes unavailable; bit-exactness tests against it will skip" >&2
}
# Axolotl 0.21.0 for tests/test_integration_axolotl.py: --no-deps (its pins include GPU/cloud packages
# and a torch range) and --ignore-requires-python (it declares >= 3.12; it runs on 3.11), plus exactly
# the packages its imported modules need, each pinned (tests/requirements-axolotl.txt).
$PY -m pip install -q --no-deps --ignore-requires-python -r tests/requirements-axolotl.txt || {
  [ -n "${CI:-}" ] && exit 1
  echo "warning: could not install Axolotl; tests/test_integration_axolotl.py will skip" >&2
}
# GoogleTest and CMake for tests/cpp. Outside CI, a machine that cannot install them (e.g. an
# offline GPU box) skips the C++ suite with a warning; in CI that is an error.
if ! ls /usr/lib/*/cmake/GTest/GTestConfig.cmake >/dev/null 2>&1 || ! command -v cmake >/dev/null; then
  if ! { apt-get update -qq && apt-get install -y -qq libgtest-dev cmake >/dev/null; }; then
    [ -n "${CI:-}" ] && exit 1
    echo "warning: GoogleTest/CMake unavailable; skipping the C++ suite" >&2
    export MOEQUANT_SKIP_CPP_TESTS=1
  fi
fi

MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e .
$PY -m pytest tests -q -rs "$@"
PYTHON=$PY bash tests/run_newest_transformers.sh  # the integration tests on the newest transformers too
