"""Which side runs an op: the Triton kernel or the pure-torch reference.

`SLOTSERVE_KERNELS` (read at every call, so tests may flip it):
  auto   (default) Triton on CUDA tensors, the reference otherwise;
  triton always Triton, even on CPU tensors (with TRITON_INTERPRET=1 in tests);
  torch  always the reference.
"""

from __future__ import annotations

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
