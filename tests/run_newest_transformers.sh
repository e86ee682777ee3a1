#!/usr/bin/env bash
# Runs the transformers/PEFT integration tests against the newest transformers release that installs
# here (the main suite runs the pinned one from tests/requirements.txt). A venv with
# --system-site-packages reuses this interpreter's torch, the built moequant and the other test
# dependencies; only transformers and what it needs go into the venv, with torch held at the
# installed version so pip can never replace it.
#
# The newest release is tried first, with what it needs pinned (transformers 5.25.0 requires
# kernels>=0.19.1,<0.20) and the newest accelerate (1.16.0; the main suite pins 1.15.0); where that
# does not install, the run falls back to 5.24.0.
# MOEQUANT_NEWEST_TRANSFORMERS overrides the list (one requirement set per line). 5.25 turns hub
# kernels on in from_pretrained by default, so where it installs the tests run with hub kernels on
# (offline: test_hub_kernels_compose_or_are_refused maps a local RMSNorm kernel build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CANDIDATES=${MOEQUANT_NEWEST_TRANSFORMERS:-"transformers==5.25.0 kernels==0.19.1 accelerate==1.16.0
transformers==5.24.0"}
VENV=${MOEQUANT_NEWEST_VENV:-${TMPDIR:-/tmp}/moequant-newest-transformers}

[ -x "$VENV/bin/python" ] || $PY -m venv --system-site-packages "$VENV"
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__)")
CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
installed=""
while IFS= read -r spec; do
  [ -n "$spec" ] || continue
  # shellcheck disable=SC2086  # one or more requirement specifiers
  if "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" $spec; then
    installed=$spec
    break
  fi
  echo "note: $spec does not install here; trying the next release" >&2
done <<< "$CANDIDATES"
if [ -z "$installed" ]; then
  [ -n "${CI:-}" ] && exit 1
  echo "warning: no transformers release of the list installed (offline?); skipping the newest-transformers run" >&2
  exit 0
fi
"$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import sys
import torch, transformers, moequant  # noqa: F401  (moequant: the build this interpreter uses)
assert torch.__version__ == sys.argv[1], f"torch changed in the venv: {torch.__version__} != {sys.argv[1]}"
import accelerate
print(f"newest-transformers run: transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"torch {torch.__version__}")
EOF
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider \
  tests/test_integration_transformers.py tests/test_integration_experts_compat.py tests/test_integration_peft.py "$@"
