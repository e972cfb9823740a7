"""Which side runs an op: the Triton kernel or the pure-torch reference.

`SLOTSERVE_KERNELS` (read at every call, so tests may flip it):
  auto   (default) Triton on CUDA tensors, the reference otherwise;
  triton always Triton, even on CPU tensors (with TRITON_INTERPRET=1 in tests);
  torch  always the reference.
One exception: an engine on the CPU picks its KV pool layout when it loads (head-major for
the torch side, token-major for Triton's store_kv), so flip the variable before loading
it; after, Triton's store_kv refuses the head-major pool with a ValueError.
"""

from __future__ import annotations

import functools
import os

import torch

CHOICES = ("auto", "triton", "torch")


def backend() -> str:
    value = os.environ.get("SLOTSERVE_KERNELS", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"SLOTSERVE_KERNELS={value!r}; valid values are {', '.join(CHOICES)}")
    return value


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on tensor `x` should run the Triton kernel."""
    choice = backend()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return x.is_cuda


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of `device` (4 off CUDA: small grids for the interpreter).

    Launchers size their grids with it; `slotserve.kernels.aot` replaces it with an H100's
    132 to compile the launches an H100 would get.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
