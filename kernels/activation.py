"""SwiGLU activation on the concatenated gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x[T, 2I] -> silu(x[:, :I]) * x[:, I:] as [T, I].

    Rounding order matches HF `act_fn(gate) * up`: silu in fp32 rounded to x.dtype, then
    the product (exact in fp32 for fp16/bf16 operands) rounded once more.
    """
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter], x[..., inter:]
    a = F.silu(gate.float()).to(x.dtype)
    return (a.float() * up.float()).to(x.dtype)
