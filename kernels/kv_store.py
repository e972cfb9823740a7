"""Write the new keys/values of a step into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, T, k_st, k_sh, v_st, v_sh,
                     HK: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    # One program per BLOCK_T tokens: their [Hk, D] keys and values to cache rows `slot`
    # (contiguous cache, so a row is Hk*D contiguous elements). k and v are loaded without
    # waiting for the slot (a padding token's row is read and dropped), so a program costs
    # one memory round trip before its stores; rows of D contiguous -> 16-byte accesses.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    slot = tl.load(slot_ptr + t, mask=tmask, other=-1).to(tl.int64)
    t3 = t[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = tmask[:, None, None] & (h < HK) & (d < D)
    k = tl.load(k_ptr + t3 * k_st + h * k_sh + d, mask=mask)
    v = tl.load(v_ptr + t3 * v_st + h * v_sh + d, mask=mask)
    dst = slot[:, None, None] * (HK * D) + h * D + d
    keep = mask & (slot >= 0)[:, None, None]
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=keep)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=keep)


def store_kv_launch_meta(t: int, hk: int, d: int, sms: int, elem_bytes: int = 2) -> dict:
    """Tile sizes and warps of `_store_kv_kernel` for T tokens of [Hk, D].

    Up to 4K elements of k (and of v) per program, more than one token only while the grid
    keeps >= 4 programs per SM; warps so each thread holds >= 16 contiguous bytes (one
    16-byte access) when the tile allows.
    """
    bh, bd = triton.next_power_of_2(hk), triton.next_power_of_2(d)
    block_t = 1
    while block_t < 16 and 2 * block_t * bh * bd <= 4096 and triton.cdiv(t, 2 * block_t) >= 4 * sms:
        block_t *= 2
    warps = max(1, min(4, block_t * bh * bd // (32 * max(1, 16 // elem_bytes))))
    return dict(BLOCK_T=block_t, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Triton `store_kv_ref`; no host synchronisation. k/v may be strided views (e.g. of a fused qkv)."""
    t, hk, d = k.shape
    if v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"store_kv: k, v must be [T, Hk, D] with unit stride on D, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.ndim != 4 or k_cache.shape[2:] != (hk, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"store_kv: caches must be [NB, BS, {hk}, {d}], "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: k_cache and v_cache must be contiguous")
    if slot_mapping.shape != (t,):
        raise ValueError(f"store_kv: slot_mapping must be [{t}], got {tuple(slot_mapping.shape)}")
    if t:
        meta = store_kv_launch_meta(t, hk, d, dispatch.sm_count(k.device), k.element_size())
        # slot_mapping is read in its own integer dtype (no conversion launch for int32)
        _store_kv_kernel[(triton.cdiv(t, meta["BLOCK_T"]),)](
            k, v, k_cache, v_cache, slot_mapping, t, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HK=hk, D=d, **meta)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v[T,Hk,D] -> k_cache, v_cache[NB,BS,Hk,D] in place, at slot = block*BS + offset.

    slot_mapping[T] int64; slot < 0 means skip (a padding token). The boolean mask makes
    this reference synchronise with the host; the Triton kernel does not.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    hk, d = k_cache.shape[-2:]
    k_cache.view(-1, hk, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, hk, d)[slots] = v[keep].to(v_cache.dtype)
