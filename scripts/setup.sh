#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with slotserve installed editable.
# Idempotent: a second run only checks a stamp and returns in about a second.
# torch is pinned here so pip never pulls a multi-GB CUDA build onto a CPU machine:
# override with SLOTSERVE_TORCH="torch==X --index-url ..." on a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SLOTSERVE_TORCH:-torch==2.13.0}
stamp_src="$(cat pyproject.toml scripts/setup.sh; echo "$TORCH_SPEC")"
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)

if [ -f .venv/.slotserve-stamp ] && [ "$(cat .venv/.slotserve-stamp)" = "$stamp" ] \
   && .venv/bin/python -c "import slotserve, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first and pinned, so the dependency range in pyproject is already satisfied.
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -vE "^WARNING: Location|BuildBackendWarning|^ +|^$|!!" || true
.venv/bin/python -c "import slotserve, torch, transformers, ray, triton; print('setup: torch', torch.__version__, '| ray', ray.__version__, '| triton', triton.__version__)"
echo "$stamp" > .venv/.slotserve-stamp
