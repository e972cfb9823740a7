#!/usr/bin/env bash
# The GPU checks this project still owes (issues 3 and 4), in one place, for a machine
# with a CUDA GPU and torch/triton/transformers already installed (a CUDA runner, the
# Dockerfile.cuda image, or a lent device machine). Each part fits in ~10 minutes.
#
#   scripts/gpu_check.sh OUT_DIR [kernels|tests|engine|all]
#
# kernels: every Triton kernel against its reference on the GPU (sampler sets exactly),
#          then time and GB/s against eager and torch.compile -> OUT_DIR/kernels.json
# tests:   the gpu-marked tests (CUDA graphs, capture beside a running engine, parking to
#          pinned host) and the kernel tests on CUDA tensors -> OUT_DIR/tests.txt
# engine:  engine vs transformers on a 1B Llama in bf16, batch-1 decode as a fraction of
#          the memory-bandwidth limit -> OUT_DIR/engine.json
set -euo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [kernels|tests|engine|all]}
what=${2:-all}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e .
# Console scripts, never `python -m pytest` from the root: that would put ./kernels on
# sys.path, shadowing the `kernels` package transformers imports.
bin=$(python3 -P -c 'import os, sys; print(os.path.dirname(sys.executable))')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
python3 -P -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.csv"

if [[ $what == kernels || $what == all ]]; then
  python3 benchmarks/bench_kernels.py --check --json "$out/kernels.json" 2>&1 | tee "$out/kernels.txt"
fi
if [[ $what == tests || $what == all ]]; then
  "$bin/pytest" -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/tests.txt"
  "$bin/pytest" -q -p no:cacheprovider tests/test_kernels_*.py 2>&1 | tee -a "$out/tests.txt"
fi
if [[ $what == engine || $what == all ]]; then
  python3 benchmarks/bench_engine.py --device cuda --model-size 1b --json "$out/engine.json" 2>&1 \
    | tee "$out/engine.txt"
fi
