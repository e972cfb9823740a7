#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with slotserve installed editable,
# every package at the exact version in requirements.lock (refresh it with scripts/lock.sh).
# Idempotent: a second run only checks a stamp and returns in about a second.
#
# SLOTSERVE_TORCH_BUILD picks torch's build: cpu (the default: never a multi-GB CUDA
# build by accident) or a CUDA build such as cu128 or cu130. The version is the one in
# scripts/torch-version, shared with Dockerfile.cuda and the GPU workflow. The build comes
# from https://download.pytorch.org/whl/<build> (SLOTSERVE_TORCH_INDEX names a mirror), or
# from wherever pip is configured to find it (on the CI machine: a CPU wheel on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=$(cat scripts/torch-version)
TORCH_BUILD=${SLOTSERVE_TORCH_BUILD:-cpu}
TORCH_INDEX=${SLOTSERVE_TORCH_INDEX:-https://download.pytorch.org/whl/$TORCH_BUILD}
stamp=$(cat pyproject.toml requirements.lock scripts/setup.sh scripts/install.sh scripts/torch-version \
        <(echo "$TORCH_BUILD $TORCH_INDEX") | sha256sum | cut -c1-16)

if [ -f .venv/.slotserve-stamp ] && [ "$(cat .venv/.slotserve-stamp)" = "$stamp" ] \
   && .venv/bin/python -c "import slotserve, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

quiet() { grep -vE '^WARNING: (Location|Retrying)|BuildBackendWarning|^ +|^$|!!' || true; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip -q)
"${pip[@]}" install "$(grep '^pip==' requirements.lock)" 2>&1 | quiet  # the locked pip, like everything else
# The same steps as Dockerfile.cuda (scripts/install.sh): torch first, as its own build
# (the lock then finds `torch==X` satisfied by `X+<build>`), then everything else at its
# locked version with --no-deps (an upstream release cannot change a fresh clone), then
# slotserve itself, editable.
export PYTHON=.venv/bin/python SLOTSERVE_TORCH_BUILD=$TORCH_BUILD SLOTSERVE_TORCH_INDEX=$TORCH_INDEX
bash scripts/install.sh deps 2>&1 | quiet
bash scripts/install.sh app --no-build-isolation -e . 2>&1 | quiet
.venv/bin/python -c "import slotserve, torch, transformers, ray, triton; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| triton', triton.__version__)"
echo "$stamp" > .venv/.slotserve-stamp
