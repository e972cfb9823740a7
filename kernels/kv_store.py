"""Write the new keys/values of a step into the paged KV cache."""

from __future__ import annotations

import torch


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
