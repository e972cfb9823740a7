"""Which side runs an op: the Triton kernel or the pure-torch reference.

`SLOTSERVE_KERNELS` (read at every call, so tests may flip it):
  auto   (default) Triton on CUDA tensors, the reference otherwise;
  triton always Triton, even on CPU tensors (with TRITON_INTERPRET=1 in tests);
  torch  always the reference.
"""

from __future__ import annotations

import importlib
import os

import torch

CHOICES = ("auto", "triton", "torch")

# Modules that hold @triton.jit kernels (reloaded by `enable_interpreter`).
KERNEL_MODULES = ("rms_norm", "rope", "activation", "kv_store", "decode_attention", "sampling")


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


def enable_interpreter() -> None:
    """Run every kernel through Triton's CPU interpreter (tests on machines without a GPU).

    Triton reads TRITON_INTERPRET when `@triton.jit` *decorates* a function, i.e. when a
    kernel module is imported, not at launch. Another test may have imported the kernels
    first, so set the variable and re-import any module whose kernels were compiled for
    a GPU. `importlib.reload` re-executes into the same module dict, so launchers that were
    imported earlier see the new kernels too.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.jit import JITFunction

    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"{__package__}.{name}")
        if any(isinstance(v, JITFunction) for v in vars(mod).values()):
            importlib.reload(mod)
