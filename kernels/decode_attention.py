"""Paged decode attention: one new query token per sequence, grouped-query, split-KV."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch


@triton.jit
def _split_kernel(q_ptr, kc_ptr, vc_ptr, tab_ptr, lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr, scale,
                  q_sb, q_sh, c_sblk, c_stok, c_sh, tab_sb, o_sb, o_sh,
                  NUM_SPLITS, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  SINGLE: tl.constexpr, IEEE: tl.constexpr):
    # grid (B, Hk, NUM_SPLITS). One program: the GROUP query heads sharing KV head `kh`
    # (each K/V tile is loaded once for the group), over one contiguous chunk of the
    # sequence. Online softmax in fp32; writes the chunk's normalised output and its
    # log-sum-exp (or, with one split, the final output).
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < GROUP, d < D
    qh = kh * GROUP + g                                                # [BLOCK_G] query heads
    q = tl.load(q_ptr + b * q_sb + qh[:, None] * q_sh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        blk = tl.load(tab_ptr + b * tab_sb + n // BS, mask=nmask, other=0).to(tl.int64)
        row = blk * c_sblk + (n % BS) * c_stok + kh * c_sh              # [BLOCK_N] token rows
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(nmask[None, :], qk * scale, float("-inf"))       # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0                                                      # empty chunk / sequence -> zeros
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    omask = gmask[:, None] & dmask[None, :]
    if SINGLE:
        tl.store(out_ptr + b * o_sb + qh[:, None] * o_sh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        mid = (b * (GROUP * tl.num_programs(1)) + qh) * NUM_SPLITS + split   # mid_lse[B, Hq, S]
        tl.store(mid_o_ptr + mid[:, None] * D + d[None, :], o, mask=omask)
        tl.store(mid_lse_ptr + mid, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=gmask)


@triton.jit
def _reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, o_sb, o_sh, NUM_SPLITS, D: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (B, Hq): combine the splits' outputs weighted by exp(lse_s - max lse).
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (b * tl.num_programs(1) + h) * NUM_SPLITS
    lse = tl.load(mid_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))          # 0 for empty splits
    o = tl.load(mid_o_ptr + (base + s)[:, None] * D + d[None, :], mask=(w > 0)[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _num_splits(batch: int, hk: int, max_len: int, device: torch.device) -> int:
    # Enough programs for ~2 waves over the SMs, but chunks of >= 128 tokens of the longest
    # possible sequence (the table width; seq_lens stays on the device, no sync). Short
    # sequences in a wide table simply leave their tail splits empty.
    want = triton.cdiv(2 * dispatch.sm_count(device), batch * hk)
    return max(1, min(want, triton.cdiv(max_len, 128), 64))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  num_splits: int | None = None) -> torch.Tensor:
    """Triton `paged_decode_attention_ref`: split-KV (flash-decoding) + reduce, no host sync.

    `num_splits` overrides the heuristic (tests use it to exercise the reduce stage).
    """
    if q.ndim != 3 or q.stride(-1) != 1:
        raise ValueError(f"paged_decode_attention: q must be [B, Hq, D] with unit stride on D, got {tuple(q.shape)}")
    b, hq, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape or k_cache.shape[-1] != d or k_cache.stride(-1) != 1 \
            or k_cache.stride() != v_cache.stride():
        raise ValueError(f"paged_decode_attention: caches must both be [NB, BS, Hk, {d}] with unit stride on D, "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, bs, hk, _ = k_cache.shape
    if hq % hk:
        raise ValueError(f"paged_decode_attention: Hq={hq} must be a multiple of Hk={hk}")
    if d > 256:
        raise ValueError(f"paged_decode_attention: head dim {d} > 256 is not supported")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"paged_decode_attention: block_tables must be [{b}, MaxBlocks] and seq_lens [{b}], "
                         f"got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    group = hq // hk
    splits = num_splits or _num_splits(b, hk, block_tables.shape[1] * bs, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if block_d <= 128 else 32
    mid_o = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device) if splits > 1 else out
    mid_lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device) if splits > 1 else out
    _split_kernel[(b, hk, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, mid_o, mid_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), splits, GROUP=group, D=d, BS=bs,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n, SINGLE=splits == 1,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    if splits > 1:
        _reduce_kernel[(b, hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), splits, D=d,
                                BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return out


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
