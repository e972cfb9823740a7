"""RMSNorm, optionally fused with the residual add (Llama/Qwen pre-norm blocks)."""

from __future__ import annotations

import torch


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
