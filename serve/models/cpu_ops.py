"""The lean model's CPU fast paths: decode attention without padding, small-batch matmuls,
and fused forms of the kernels' torch references.

On CUDA the Triton kernels and cuBLAS do this work; on the CPU two things cost more than
the arithmetic, and both were measured on the 2-core development VM (AVX-512, MKL):
- one padded, masked SDPA over a gathered batch copies every sequence's K/V and pads to
  the longest; one SDPA per sequence on a view of its own (consecutive) blocks copies
  nothing (`decode_attention_cpu`, ~5x less work), and with the CPU pool's head-major
  storage (`KVLayout.head_major`) each head's rows of that view are contiguous;
- MKL's `x @ w.T` for a skinny x (2..64 rows: decode batches) runs 1.3-2.5x slower than
  `w @ x.T` on the same data; from 128 rows up (prefill) it is the other way round. One
  row is worst of all: `F.linear` becomes a matrix-vector product that read the weights
  at a third of the bandwidth `w @ x.T` reaches with two columns (all of a 25M model's
  projections: 11.2 ms vs 4.4 ms), so a single row is duplicated into two
  (`linear`; `benchmarks/results/engine-cpu.md`).
- a decode step is hundreds of small ops, and each op's dispatch costs microseconds. For
  fp32 the fused forms below give bit-identical results to the kernels' references with
  fewer ops: torch's `rms_norm`, one rope table gather per step instead of one per layer,
  and `index_copy_` into the KV pool without the reference's padding mask (a decode step
  of 8 rows: ~10% less time).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from slotserve.kernels.dispatch import use_triton
from slotserve.kernels.rope import rotate_ref

SKINNY_ROWS = (1, 64)   # row counts for which `w @ x.T` beats `x @ w.T` on the CPU


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed as `(w @ x.T).T` for 1..64 rows of a 2-D fp32 x on the CPU.

    The result is the same product summed in a different order (fp32 differences of a
    few ulps, like any change of batch size); it is made contiguous so views downstream
    (split heads, reshape) stay cheap. One row is computed as two copies of itself: MKL's
    two-column product is a matrix-matrix kernel that runs on every core at full
    bandwidth, where one column would be its slower matrix-vector kernel.
    """
    rows = x.shape[0] if x.dim() == 2 else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32
            or not SKINNY_ROWS[0] <= rows <= SKINNY_ROWS[1]):   # measured for fp32 only
        return F.linear(x, w, b)
    xt = x.t() if rows > 1 else x.expand(2, -1).contiguous().t()
    out = torch.mm(w, xt) if b is None else torch.addmm(b[:, None], w, xt)
    return out.t()[:rows].contiguous()


def applies(x: torch.Tensor) -> bool:
    """True when the fused forms below replace the kernels for activations `x`: fp32 on the
    CPU with the torch side chosen (they are bit-identical to the references only in fp32)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not use_triton(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`kernels.rms_norm_ref` in torch's one-op `rms_norm` (fp32: the same bits)."""
    if residual is None:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x = x + residual
    return F.rms_norm(x, (x.shape[-1],), weight, eps), x


def rope(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> Callable:
    """`(q, k) -> kernels.apply_rope_ref(q, k, positions, cos_sin_cache)`, with the table rows
    for `positions` gathered once for every layer of the step instead of once per layer."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions).float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return lambda q, k: (rotate_ref(q, cos, sin), rotate_ref(k, cos, sin))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """`kernels.store_kv_ref` for a step with no padding slots (the CPU runner never pads:
    padding exists for CUDA graphs), so without the reference's mask and its host sync."""
    hk, d = k_cache.shape[-2:]
    k_cache.view(-1, hk, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hk, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def cpu_decode_plan(block_tables: list[list[int]], seq_lens: list[int], block_size: int) -> list:
    """Per sequence, where its K/V live: ("view", first_slot, n) when its blocks are consecutive
    in the pool (no copy needed), else ("gather", block_ids[int64], n)."""
    plan = []
    for table, n in zip(block_tables, seq_lens):
        blocks = table[: -(-n // block_size)]
        b0 = blocks[0]
        if blocks[-1] - b0 == len(blocks) - 1 and blocks == list(range(b0, b0 + len(blocks))):
            plan.append(("view", b0 * block_size, n))
        else:
            plan.append(("gather", torch.tensor(blocks, dtype=torch.int64), n))
    return plan


def decode_attention_cpu(q, k_cache, v_cache, plan, scale) -> torch.Tensor:
    """Paged decode attention on the torch side: one SDPA per sequence on its own K/V.

    Measured on 2 CPU cores, ~5x less work than one padded, masked SDPA over a gathered
    batch (what `kernels.paged_decode_attention_ref` does): no padding to the longest
    sequence, no mask, and no copy at all for sequences whose blocks are consecutive.
    q[B,Hq,D], caches [NB,BS,Hk,D] -> [B,Hq,D]. On CUDA the Triton kernel runs instead.
    """
    nb, bs, hk, d = k_cache.shape
    hq = q.shape[1]
    k_tok, v_tok = k_cache.view(nb * bs, hk, d), v_cache.view(nb * bs, hk, d)   # a view in either layout
    out = torch.empty_like(q)
    for i, (kind, where, n) in enumerate(plan):
        if kind == "view":
            k, v = k_tok[where:where + n], v_tok[where:where + n]
        else:
            k = k_cache.index_select(0, where).flatten(0, 1)[:n]
            v = v_cache.index_select(0, where).flatten(0, 1)[:n]
        o = F.scaled_dot_product_attention(q[i, None, :, None, :], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           scale=scale, enable_gqa=hq != hk)       # [1, Hq, 1, D]
        out[i] = o[0, :, 0]
    return out


def paged_decode_attention_sdpa(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """`decode_attention_cpu` with the kernels' `paged_decode_attention` signature (tensors in)."""
    plan = cpu_decode_plan(block_tables.tolist(), seq_lens.tolist(), k_cache.shape[1])
    return decode_attention_cpu(q, k_cache, v_cache, plan, scale)

