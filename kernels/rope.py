"""Rotary position embedding of q and k (Llama/Qwen "rotate half" layout)."""

from __future__ import annotations

import torch


def build_cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, inv_freq: torch.Tensor | None = None,
                        attention_scaling: float = 1.0) -> torch.Tensor:
    """-> [max_pos, head_dim]; row p = cat(cos(p * inv_freq), sin(p * inv_freq)) * attention_scaling.

    Plain Llama rope by default (inv_freq = base ** -(2i / head_dim)). For rope_scaling
    variants (llama3, yarn, ...) pass the model's own `inv_freq[head_dim/2]` and its
    attention scaling. Angles are computed in fp32 like HF (`inv_freq @ positions`).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half rope, got {head_dim}")
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    assert inv_freq.shape == (head_dim // 2,), inv_freq.shape
    pos = torch.arange(max_pos, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]                          # [max_pos, D/2]
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling).to(dtype)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x[T,H,D], cos/sin[T,1,D/2] fp32; one rounding to x.dtype at the end
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """q[T,Hq,D], k[T,Hk,D], positions[T] int64, cos_sin_cache[max_pos, D] -> (q', k').

    Out of place: returns new tensors, the inputs are untouched. Math in fp32, one
    rounding to the input dtype (HF rounds after each multiply in fp16/bf16, so those
    dtypes differ from HF by ~1 ulp; fp32 matches).
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long()).float()     # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)
