"""Rotary position embedding of q and k (Llama/Qwen "rotate half" layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, T, q_st, q_sh, k_st, k_sh, qo_st, ko_st, cache_st,
                 HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per BLOCK_T tokens, all their q and k heads in one tile each (no loop).
    # Every load is issued before the first store, and none of q/k waits for the position,
    # so a program costs about two memory round trips (positions + q/k, then cos/sin);
    # each head row is HALF contiguous elements -> 16-byte vector loads and stores.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    pos = tl.load(pos_ptr + t, mask=tmask, other=0)
    t3 = t[:, None, None]
    m3 = tmask[:, None, None]
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    hq = tl.arange(0, BLOCK_HQ)[None, :, None]
    hk = tl.arange(0, BLOCK_HK)[None, :, None]
    qmask = m3 & (hq < HQ) & (d < HALF)
    kmask = m3 & (hk < HK) & (d < HALF)
    q_src = q_ptr + t3 * q_st + hq * q_sh + d
    k_src = k_ptr + t3 * k_st + hk * k_sh + d
    q1 = tl.load(q_src, mask=qmask, other=0.0)
    q2 = tl.load(q_src + HALF, mask=qmask, other=0.0)
    k1 = tl.load(k_src, mask=kmask, other=0.0)
    k2 = tl.load(k_src + HALF, mask=kmask, other=0.0)
    # cos and sin in one load ([BLOCK_T, BLOCK_HALF, 2]: both issued at once), then split
    dc = tl.arange(0, BLOCK_HALF)[None, :, None]
    half = tl.arange(0, 2)[None, None, :] * HALF
    cs = tl.load(cache_ptr + pos[:, None, None] * cache_st + half + dc, mask=m3 & (dc < HALF), other=0.0)
    cos, sin = tl.split(cs.to(tl.float32))
    cos, sin = cos[:, None, :], sin[:, None, :]                             # [BLOCK_T, 1, BLOCK_HALF]
    q1, q2, k1, k2 = q1.to(tl.float32), q2.to(tl.float32), k1.to(tl.float32), k2.to(tl.float32)
    q_dst = qo_ptr + t3 * qo_st + hq * (2 * HALF) + d                       # outputs are contiguous
    k_dst = ko_ptr + t3 * ko_st + hk * (2 * HALF) + d
    tl.store(q_dst, (q1 * cos - q2 * sin).to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(q_dst + HALF, (q2 * cos + q1 * sin).to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(k_dst, (k1 * cos - k2 * sin).to(ko_ptr.dtype.element_ty), mask=kmask)
    tl.store(k_dst + HALF, (k2 * cos + k1 * sin).to(ko_ptr.dtype.element_ty), mask=kmask)


def rope_launch_meta(t: int, hq: int, hk: int, d: int, sms: int, elem_bytes: int = 2) -> dict:
    """Tile sizes and warps of `_rope_kernel` for T tokens of [Hq, D] q and [Hk, D] k.

    A tile holds BLOCK_T tokens' padded heads (up to 8K elements), more than one token
    only while the grid keeps >= 4 programs per SM. Warps: as few as give the smallest
    tile (one half of k) 16 contiguous bytes per thread, so every q/k load and store can
    be a 16-byte vector access (a thread then holds several of q's).
    """
    half = d // 2
    block_half = triton.next_power_of_2(half)
    bq, bk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    per_token = (bq + bk) * 2 * block_half
    block_t = 1
    while block_t < 8 and 2 * block_t * per_token <= 8192 and triton.cdiv(t, 2 * block_t) >= 4 * sms:
        block_t *= 2
    vec = max(1, 16 // elem_bytes)
    warps = max(1, min(8, block_t * bk * block_half // (32 * vec)))
    return dict(BLOCK_T=block_t, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=block_half, num_warps=warps)


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
        meta = rope_launch_meta(t, hq, hk, d, dispatch.sm_count(q.device), q.element_size())
        _rope_kernel[(triton.cdiv(t, meta["BLOCK_T"]),)](
            q, k, qo, ko, positions, cos_sin_cache, t, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), ko.stride(0), cos_sin_cache.stride(0), HQ=hq, HK=hk, HALF=d // 2, **meta)
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


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x[T,H,D], cos/sin[T,1,D/2] fp32 -> x rotated (neox halves); one rounding to x.dtype at the end."""
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
    return rotate_ref(q, cos, sin), rotate_ref(k, cos, sin)
