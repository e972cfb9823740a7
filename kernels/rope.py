"""Rotary position embedding of q and k (Llama/Qwen "rotate half" layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_rotate(src_ptr, dst_ptr, t, src_st, src_sh, dst_st, dst_sh, cos, sin, NH, HALF,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # rotate one token's [NH, D] heads, BLOCK_H at a time; cos/sin [1, BLOCK_HALF] fp32
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, NH, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < NH) & (d < HALF)
        src = src_ptr + t * src_st + h * src_sh + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = dst_ptr + t * dst_st + h * dst_sh + d
        tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, q_st, q_sh, k_st, k_sh, qo_st, qo_sh, ko_st,
                 ko_sh, cache_st, HQ, HK, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token: read its cos/sin row once, rotate all q and k heads.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    row = cache_ptr + pos * cache_st + d
    cos = tl.load(row, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    _rope_rotate(q_ptr, qo_ptr, t, q_st, q_sh, qo_st, qo_sh, cos, sin, HQ, HALF, BLOCK_H, BLOCK_HALF)
    _rope_rotate(k_ptr, ko_ptr, t, k_st, k_sh, ko_st, ko_sh, cos, sin, HK, HALF, BLOCK_H, BLOCK_HALF)


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Triton `apply_rope_ref`, q and k in one launch; out of place (q, k may be strided views)."""
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"apply_rope: q must be [T, Hq, D] and k [T, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    t, hq, d = q.shape
    if d % 2 or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"apply_rope: D must be even with unit stride, got D={d}")
    if cos_sin_cache.ndim != 2 or cos_sin_cache.shape[1] != d or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"apply_rope: cos_sin_cache must be [max_pos, {d}], got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (t,):
        raise ValueError(f"apply_rope: positions must be [{t}], got {tuple(positions.shape)}")
    hk = k.shape[1]
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        half = d // 2
        block_half = triton.next_power_of_2(half)
        block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), 2048 // block_half))
        _rope_kernel[(t,)](q, k, qo, ko, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos_sin_cache.stride(0), hq, hk,
                           half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)
    return qo, ko


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
