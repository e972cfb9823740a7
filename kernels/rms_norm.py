"""RMSNorm, optionally fused with the residual add (Llama/Qwen pre-norm blocks)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, x_stride, res_stride, y_stride, res_out_stride,
                     H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row; the whole row stays in registers (H <= BLOCK).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)       # the add rounds to x.dtype (HF)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # HF: weight * normed.to(dtype); the product of two 16-bit floats is exact in fp32,
    # so rounding it once equals the 16-bit multiply.
    y = (h * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Triton `rms_norm_ref`: one launch, x (and residual) read once, y (and residual) written once."""
    if x.ndim != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm: x must be [T, H] with unit stride on H, got {tuple(x.shape)} {x.stride()}")
    t, h = x.shape
    if weight.shape != (h,):
        raise ValueError(f"rms_norm: weight must be [{h}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"rms_norm: residual must be {tuple(x.shape)} with unit stride, got {tuple(residual.shape)}")
    weight = weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(y) if residual is not None else y
    if t:
        block = triton.next_power_of_2(h)
        warps = min(max(block // 512, 1), 16)
        _rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, y, res_out,
                               x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
                               res_out.stride(0), h, eps, HAS_RES=residual is not None, BLOCK=block, num_warps=warps)
    return y if residual is None else (y, res_out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x[T,H], weight[H] -> y[T,H]; with residual[T,H] -> (y, new_residual).

    new_residual = x + residual (added in x.dtype, as the HF decoder layer does), and
    y = rmsnorm(new_residual) * weight. The cast order matches HF `LlamaRMSNorm`:
    normalise in fp32, cast back to the input dtype, then multiply by the weight.
    """
    if residual is not None:
        x = x + residual
        residual = x
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight * h.to(x.dtype)).to(x.dtype)
    return y if residual is None else (y, residual)
