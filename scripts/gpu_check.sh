#!/usr/bin/env bash
# The one prepared GPU run, for any machine with a CUDA GPU (a lent device machine, a CUDA
# runner, the Dockerfile.cuda image): every part under its own `timeout`, all of it inside
# one budget that fits a 10-minute command.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [kernels] [tests] [engine] [profile]   (default: the first three, in
#                                                                       that order; else as named)
#
# kernels: every Triton kernel against its reference on the GPU (sampler sets exactly), then
#          time and GB/s against eager and torch.compile           -> kernels.json, kernels.txt
# tests:   the kernel tests (tests/test_kernels_*.py) on CUDA tensors, then every other
#          gpu-marked test (CUDA graphs, parking to pinned host)  -> tests-*.txt, tests-*.xml
# engine:  engine vs transformers on a 1B Llama in bf16, batch-1 decode as a fraction of the
#          memory-bandwidth limit                                   -> engine.json, engine.txt
# profile: (only when named) where a 1B batch-1 decode step's time goes: kernel time vs wall,
#          launches per token, the top kernels (torch.profiler)    -> profile.json, profile.txt
# Always: env.txt (device, driver, torch, triton, CUDA, Python, which venv and how it was
# made, commit) and summary.tsv (each part: status, exit code, seconds, its limit).
#
# OUT_DIR defaults to benchmarks/results/gpu-{device} in this checkout; "{device}" becomes
# the GPU's name (e.g. nvidia-h200, as benchmarks/run_all.py names machines).
# Python: $SLOTSERVE_VENV, else the active venv ($VIRTUAL_ENV: the image's /opt/venv) when
# it holds slotserve, else .venv. With none, `SLOTSERVE_TORCH_BUILD=cu128 bash
# scripts/setup.sh` makes .venv (SLOTSERVE_TORCH_BUILD overrides the build); when that
# cannot run (no network) or fails, the fallback is a venv over the machine's python3 and
# the packages it already holds (its torch and Triton, not requirements.lock's), with
# slotserve linked from this tree; env.txt then says "fallback" and why.
# SLOTSERVE_GPU_CHECK_SECONDS: the whole budget (570); a part that no longer fits is skipped
# and says so. Without a CUDA device nothing runs (exit 2), unless
# SLOTSERVE_GPU_CHECK_ALLOW_CPU=1 (to check this script itself; the device is then "cpu").
# Everything runs through the venv's interpreter or console scripts, from a scratch folder:
# the repository root never reaches sys.path (./kernels would shadow the `kernels` package).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
budget=${SLOTSERVE_GPU_CHECK_SECONDS:-570}
deadline=$((SECONDS + budget))
out=benchmarks/results/gpu-{device}
parts=()
for arg in "$@"; do
  case $arg in
    kernels|tests|engine|profile) parts+=("$arg") ;;
    all) parts+=(kernels tests engine) ;;
    /*) out=$arg ;;
    *) out=$PWD/$arg ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(kernels tests engine)
cd "$repo"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
log() { echo "gpu_check: $*" >&2; }

# ------------------------------------------------------------------------- the venv
how=""
if [ -n "${SLOTSERVE_VENV:-}" ]; then
  venv=$SLOTSERVE_VENV how="given (SLOTSERVE_VENV)"
elif [ -n "${VIRTUAL_ENV:-}" ] && "$VIRTUAL_ENV/bin/python" -P -c 'import slotserve' 2>/dev/null; then
  venv=$VIRTUAL_ENV how="the active venv"
elif [ -x .venv/bin/python ]; then
  venv=$repo/.venv how="the existing .venv"
else
  build=${SLOTSERVE_TORCH_BUILD:-cu128}
  limit=$((budget / 2))
  if ! python3 -c 'import socket; socket.create_connection(("pypi.org", 443), timeout=5).close()' 2>/dev/null; then
    why="pypi.org is unreachable, so scripts/setup.sh could not run"
  elif log "no .venv: SLOTSERVE_TORCH_BUILD=$build bash scripts/setup.sh (at most ${limit}s)" \
       && PIP_RETRIES=1 PIP_TIMEOUT=30 PIP_DEFAULT_TIMEOUT=30 timeout "$limit" \
          env SLOTSERVE_TORCH_BUILD="$build" bash scripts/setup.sh \
          > "$scratch/setup.log" 2>&1; then
    venv=$repo/.venv how="made by SLOTSERVE_TORCH_BUILD=$build scripts/setup.sh"
  else
    why="SLOTSERVE_TORCH_BUILD=$build scripts/setup.sh failed or timed out (its log: setup.log)"
    rm -rf .venv   # half made by this run: setup.sh would trust it next time
  fi
  if [ -z "$how" ]; then
    python3 -c 'import torch' 2>/dev/null || { log "$why, and python3 holds no torch: nothing to run with"; exit 3; }
    # python3 may itself be a venv: name its site-packages, not the base interpreter's.
    base=$(command -v python3)
    venv=${TMPDIR:-/tmp}/slotserve-gpu-check-venv
    rm -rf "$venv"
    python3 -m venv --without-pip "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    python3 -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
      > "$site/_base_python.pth"
    # pyproject's package-dir mapping, as links: slotserve = serve/, its kernels and bundles.
    mkdir "$site/slotserve"
    for f in "$repo"/serve/*; do ln -s "$f" "$site/slotserve/"; done
    ln -s "$repo/kernels" "$site/slotserve/kernels"
    ln -s "$repo/bundles" "$site/slotserve/bundles"
    how="fallback: $why; a venv over $base and the packages it holds (not requirements.lock's), slotserve linked from $repo"
    log "$how"
  fi
fi
py=$venv/bin/python
if [ -x "$venv/bin/pytest" ]; then pytest=("$venv/bin/pytest"); else pytest=("$py" -P -m pytest); fi

# --------------------------------------------------------------- the device, env.txt
device=$(cd "$scratch" && "$py" -P -c '
import torch
print(torch.cuda.get_device_name(0).lower().replace(" ", "-") if torch.cuda.is_available() else "cpu")')
if [ "$device" = cpu ] && [ "${SLOTSERVE_GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  log "torch in $venv sees no CUDA device: nothing to check (SLOTSERVE_GPU_CHECK_ALLOW_CPU=1 runs the parts anyway)"
  exit 2
fi
out=${out//\{device\}/$device}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ ! -f "$scratch/setup.log" ] || cp "$scratch/setup.log" "$out/setup.log"
# SLOTSERVE_COMMIT: for a copy without git (the CI container has none)
commit=${SLOTSERVE_COMMIT:-$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)}
dirty=$(git -C "$repo" status --porcelain 2>/dev/null | grep -qv '^??' && echo " (with uncommitted changes)" || true)
(cd "$scratch" && "$py" -P - "$venv" "$how" "$commit$dirty" > "$out/env.txt") <<'EOF'
import platform, subprocess, sys
import torch
def smi(q):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception as e:
        return f"unknown ({type(e).__name__})"
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
cuda = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(0) if cuda else "none (CPU only: no GPU figures here)")
print("device memory:", f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if cuda else "-")
print("driver:", smi("driver_version") if cuda else "-")
print("torch:", torch.__version__, "| CUDA (torch's build):", torch.version.cuda)
print("triton:", tv)
print("python:", platform.python_version(), sys.executable)
print("venv:", sys.argv[1], "|", sys.argv[2])
print("commit:", sys.argv[3])
print("platform:", platform.platform())
EOF
cat "$out/env.txt" >&2
printf 'part\tstatus\texit\tseconds\tlimit\n' > "$out/summary.tsv"

# ------------------------------------------------------------------------- the parts
# run_part NAME CAP RESERVE CMD...: CMD under `timeout` (SIGINT first, so pytest and the
# benchmarks still write what they have), for at most CAP seconds and never into the
# RESERVE seconds kept for the parts after it; its output goes to OUT/NAME.txt.
failed=0
run_part() {
  local name=$1 cap=$2 reserve=$3 left limit rc start
  shift 3
  left=$((deadline - SECONDS - reserve))
  limit=$((left < cap ? left : cap))
  if [ "$limit" -lt 30 ]; then
    printf '%s\tskipped (out of time)\t-\t0\t%s\n' "$name" "$limit" >> "$out/summary.tsv"
    log "$name: skipped, only ${limit}s left of the ${budget}s budget"
    failed=1
    return 0
  fi
  log "$name (at most ${limit}s)"
  start=$SECONDS
  set +e
  (cd "$scratch" && timeout --signal=INT --kill-after=20 "$limit" "$@") 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  set -e
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  [ "$status" = ok ] || failed=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" >> "$out/summary.tsv"
}

# The parts run in the order named (default kernels tests engine), so a short budget goes to
# the one that matters most. While a part runs, each part after it keeps 60 s back.
kernels() {
  run_part kernels 180 "$1" \
    "$py" "$repo/benchmarks/bench_kernels.py" --check --budget 90 --json "$out/kernels.json"
}
tests() {
  run_part tests-kernels 200 $(($1 + 60)) \
    "${pytest[@]}" -q -p no:cacheprovider -rs --junitxml "$out/tests-kernels.xml" "$repo"/tests/test_kernels_*.py
  run_part tests-gpu 150 "$1" \
    "${pytest[@]}" -q -p no:cacheprovider -rs -m gpu --continue-on-collection-errors \
    --ignore-glob="$repo/tests/test_kernels_*.py" --junitxml "$out/tests-gpu.xml" "$repo/tests"
}
engine() {
  run_part engine 240 "$1" \
    "$py" "$repo/benchmarks/bench_engine.py" --device cuda --model-size 1b --json "$out/engine.json"
}
profile() {
  run_part profile 150 "$1" "$py" "$repo/benchmarks/profile_decode.py" --json "$out/profile.json"
}
seen=" "
for ((i = 0; i < ${#parts[@]}; i++)); do
  part=${parts[$i]}
  [[ $seen == *" $part "* ]] && continue
  seen+="$part "
  "$part" $(( (${#parts[@]} - i - 1) * 60 ))
done
column -t -s $'\t' "$out/summary.tsv" >&2 2>/dev/null || cat "$out/summary.tsv" >&2
log "results in $out"
exit "$failed"
