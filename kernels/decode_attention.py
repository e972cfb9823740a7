"""Paged decode attention: one new query token per sequence, grouped-query, split-KV."""

from __future__ import annotations

import torch


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q[B,Hq,D], k/v_cache[NB,BS,Hk,D], block_tables[B,MaxBlocks] int32, seq_lens[B] int32 -> [B,Hq,D].

    Sequence b attends to its first seq_lens[b] cached tokens; token t lives at
    cache[block_tables[b, t // BS], t % BS]. Query head h reads KV head h // (Hq // Hk)
    (HF `repeat_kv`). fp32 math; a sequence of length 0 yields zeros. Gathers the whole
    table (MaxBlocks * BS tokens per row), so it is for tests and CPU, not for speed.
    """
    b, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    group = hq // hk
    assert hq == hk * group, (hq, hk)
    tables = block_tables.long().clamp(min=0)                         # unused entries may be -1
    k = k_cache[tables].reshape(b, -1, hk, d).float()                  # [B, L, Hk, D]
    v = v_cache[tables].reshape(b, -1, hk, d).float()
    qg = q.float().view(b, hk, group, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale          # [B, Hk, G, L]
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < seq_lens.long()[:, None]   # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)                # all-masked rows -> 0
    out = torch.einsum("bhgl,blhd->bhgd", p, v)
    return out.reshape(b, hq, d).to(q.dtype)
