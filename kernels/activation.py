"""SwiGLU activation on the concatenated gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, x_stride, y_stride, I, BLOCK: tl.constexpr):
    # grid (T, cdiv(I, BLOCK)): gate at [0, I), up at [I, 2I) of each row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * x_stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)                      # silu rounded like HF act_fn
    tl.store(y_ptr + row * y_stride + cols, (a.to(tl.float32) * u).to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton `silu_and_mul_ref`: reads [T, 2I] once, writes [T, I]."""
    if x.ndim != 2 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: x must be [T, 2I] with unit stride on the last dim, got {tuple(x.shape)}")
    t, inter = x.shape[0], x.shape[1] // 2
    y = torch.empty((t, inter), dtype=x.dtype, device=x.device)
    if t and inter:
        block = min(triton.next_power_of_2(inter), 1024)
        _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x, y, x.stride(0), y.stride(0), inter, BLOCK=block,
                                                               num_warps=4)
    return y


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x[T, 2I] -> silu(x[:, :I]) * x[:, I:] as [T, I].

    Rounding order matches HF `act_fn(gate) * up`: silu in fp32 rounded to x.dtype, then
    the product (exact in fp32 for fp16/bf16 operands) rounded once more.
    """
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter], x[..., inter:]
    a = F.silu(gate.float()).to(x.dtype)
    return (a.float() * up.float()).to(x.dtype)
