"""Write the new keys/values of a step into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     HK: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token: copy its [Hk, D] keys and values to cache row `slot` (contiguous cache).
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HK) & (d < D)
        k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
        v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
        dst = slot * (HK * D) + h * D + d
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


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
        _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping.long(), k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), HK=hk, D=d, BLOCK_H=triton.next_power_of_2(hk),
                               BLOCK_D=triton.next_power_of_2(d), num_warps=4)


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
