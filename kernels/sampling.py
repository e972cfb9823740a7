"""Per-row sampling: temperature, top-k, top-p, seeded draw; greedy where temperature is 0.

Triton side, without a sort and without a host sync. The top-k and top-p sets are both
"x >= threshold" on x = logit / T; each threshold is found exactly by a search over the
order-preserving int32 key of a float, every row split over vocabulary chunks so the
whole GPU works on one row. The chunks of a row agree on the search state by re-reading
each other's per-chunk totals at the next launch (every program applies the same totals).

- top-k: x = fl(z / T) is monotone in the raw logit z, so the k-th largest x is fl(z_k / T)
  for the k-th largest z. That is found by a radix select on the key of z: four 8-bit
  digits, one 256-bin `tl.histogram` per chunk and pass (no division per element).
- top-p: an NC-ary search on the key of x (IEEE division, bit-identical with torch's x)
  summing softmax mass at NC candidate thresholds; a tile whose largest key is below the
  search interval is skipped after one max, so after a top-k the passes touch few tiles.
- draw: Gumbel-max per chunk, then the best chunk wins. Rows with neither top-k nor top-p
  are drawn by the first launch, in the same pass that takes each chunk's max (greedy).

Launches (fixed, no host sync): first pass, 3 top-k steps, 7 top-p steps, draw, pick = 13;
on GPU every program of a row without top-k (top-p) returns at once from those steps. With
the caller's hint `filtered=False` (no row uses top-k/top-p) only the first pass and the
pick run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch

_M32 = 0xFFFFFFFF
RADIX = 256       # top-k: one 8-bit digit of the 32-bit key per pass
K_STEPS = 3       # top-k launches after the first pass (which counts digit 0); top-p step 0 applies digit 3
NC = 32           # top-p: candidate thresholds summed per pass (an NC-ary search)
P_STEPS = 7       # top-p passes: a 2**32 key range -> 2**27 -> ... -> 4 -> 1 key; the draw applies the 7th
INT32_MIN = -2**31


@triton.jit
def _ordered(x):
    # fp32 -> int32 with the same order (flip the magnitude bits of negatives); -0.0 takes
    # +0.0's key, so keys tie exactly where the floats compare equal
    b = x.to(tl.int32, bitcast=True)
    b = tl.where(b == -2147483648, 0, b)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _from_ordered(key):
    # the inverse of `_ordered` (int32 key -> fp32)
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _row(temp_ptr, topk_ptr, topp_ptr, row, V):
    # -> (T for division, top_k, top_p, sampled, top-k on, top-p on)
    temp = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    sampled = temp > 0
    return tl.where(sampled, temp, 1.0), k, p, sampled, sampled & (k > 0) & (k < V), sampled & (p < 1.0)


@triton.jit
def _gumbel_tile(z, cols, valid, t, seed, step, thresh):
    # Gumbel-max scores of one tile (logits z) over the allowed tokens (key(x) >= thresh).
    # Uniforms from Philox(seed, counter = (offset << 32) + column): a pure function of them.
    # IEEE division (fp32 `/` may be approximate on GPU): x bit-identical with torch's
    x = tl.math.div_rn(z, tl.zeros_like(z) + t)
    keep = (_ordered(x).to(tl.int64) >= thresh) & valid
    r = tl.randint(seed, (step << 32) + cols.to(tl.int64)).to(tl.uint32, bitcast=True)
    u = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07     # (0, 1), 23 bits, never 0 or 1
    return tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))


@triton.jit
def _radix_apply(hist_ptr, C, lo, above, k, shift, BLOCK_C: tl.constexpr, RADIX: tl.constexpr):
    # Sum the chunks' digit histograms [C, RADIX] of the keys in [lo, lo + RADIX << shift);
    # `above` keys lie over that range. Keep the largest digit d whose keys >= lo + d << shift
    # number >= k -> (new lo, keys above the new range). int64 in and out.
    cs = tl.arange(0, BLOCK_C)
    j = tl.arange(0, RADIX)
    h = tl.sum(tl.load(hist_ptr + cs[:, None] * RADIX + j[None, :], mask=(cs < C)[:, None], other=0), axis=0)
    at_or_above = above + tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h               # keys with digit >= j
    d = tl.max(tl.where(at_or_above >= k, j, -1), axis=0)                           # >= 0: count(>= lo) >= k
    above = above + tl.sum(tl.where(j > d, h, 0), axis=0)
    return lo + (d.to(tl.int64) << shift), above.to(tl.int64)


@triton.jit
def _topp_apply(acc_ptr, C, lo, hi, top_p, z, BLOCK_C: tl.constexpr, NC: tl.constexpr):
    # Sum the chunks' masses [C, NC] at the candidates lo + (hi - lo) * j // NC; keep the
    # largest candidate whose mass (tokens with key >= it) reaches top_p * z -> (lo, hi).
    # z < 0 means "z is this pass's mass at j = 0" (the first pass counts from the top-k key).
    cs = tl.arange(0, BLOCK_C)
    j = tl.arange(0, NC)
    total = tl.sum(tl.load(acc_ptr + cs[:, None] * NC + j[None, :], mask=(cs < C)[:, None], other=0.0), axis=0)
    z = tl.where(z < 0, tl.sum(tl.where(j == 0, total, 0.0), axis=0), z)
    cand = lo + (hi - lo) * j // NC
    ok = total >= top_p * z
    return tl.max(tl.where(ok, cand, lo), axis=0), tl.min(tl.where(ok, hi, cand), axis=0), z


@triton.jit
def _first_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, seed_ptr, off_ptr, part_max_ptr,
                  part_idx_ptr, g_score_ptr, g_idx_ptr, khist_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  RADIX: tl.constexpr, UNFILTERED: tl.constexpr):
    # grid (B, C), one pass over chunk c of row b: the chunk's max logit and its first index
    # (greedy rows, and m for top-p); for a sampled row without top-k/top-p, its Gumbel-max
    # draw (the row is done); for a top-k row, the histogram of digit 0 (the key's top 8
    # bits) of the raw logits -> khist[0]. UNFILTERED (the caller's promise that no row has
    # top-k/top-p): every sampled row is drawn here, any top-k/top-p ignored.
    row = tl.program_id(0)
    c = tl.program_id(1)
    C = tl.num_programs(1)
    t, k, p, sampled, k_on, p_on = _row(temp_ptr, topk_ptr, topp_ptr, row, V)
    k_on = k_on & (not UNFILTERED)
    p_on = p_on & (not UNFILTERED)
    draw = sampled & ~k_on & ~p_on
    seed = tl.load(seed_ptr + row)
    step = tl.load(off_ptr + row).to(tl.int64)
    base = logits_ptr + row.to(tl.int64) * stride
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, V)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = start
    win = tl.full([], float("-inf"), tl.float32)
    win_i = start
    hist = tl.zeros([RADIX], tl.int32)
    for c0 in range(start, end, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        valid = cols < end
        z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        zm, zi = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
        if zm > best:
            best = zm
            best_i = c0 + zi
        if draw:
            score = _gumbel_tile(z, cols, valid, t, seed, step, -2147483648)
            sm, si = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            if sm > win:
                win = sm
                win_i = c0 + si
        if k_on:
            digit = (_ordered(z) >> 24) + 128                              # [0, 256), order-preserving
            hist += tl.histogram(tl.where(valid, digit, 0), RADIX, mask=valid)
    tl.store(part_max_ptr + row * C + c, best)
    tl.store(part_idx_ptr + row * C + c, best_i)
    if draw:
        tl.store(g_score_ptr + row * C + c, win)
        tl.store(g_idx_ptr + row * C + c, win_i)
    if k_on:
        tl.store(khist_ptr + (row * C + c) * RADIX + tl.arange(0, RADIX), hist)


@triton.jit(do_not_specialize=["step"])
def _topk_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, khist_ptr, kstate_ptr, step,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, RADIX: tl.constexpr):
    # grid (B, C), top-k radix step `step` (1..3) on the keys of the raw logits: apply digit
    # step-1 (khist[(step-1) % 2], all chunks) to the row's (lo, above) state, then histogram
    # digit `step` of this chunk's keys inside the new range -> khist[step % 2].
    row = tl.program_id(0)
    c = tl.program_id(1)
    B = tl.num_programs(0)
    C = tl.num_programs(1)
    t, k, p, sampled, k_on, p_on = _row(temp_ptr, topk_ptr, topp_ptr, row, V)
    if k_on:
        src = (step - 1) % 2
        if step == 1:
            lo = tl.full([], -2147483648, tl.int64)
            above = tl.full([], 0, tl.int64)
        else:
            lo = tl.load(kstate_ptr + (src * B + row) * 2)
            above = tl.load(kstate_ptr + (src * B + row) * 2 + 1)
        lo, above = _radix_apply(khist_ptr + (src * B + row) * C * RADIX, C, lo, above, k, 32 - 8 * step,
                                 BLOCK_C, RADIX)
        if c == 0:
            tl.store(kstate_ptr + ((step % 2) * B + row) * 2, lo)
            tl.store(kstate_ptr + ((step % 2) * B + row) * 2 + 1, above)
        shift = 24 - 8 * step
        lo_d = lo.to(tl.int32) >> shift
        base = logits_ptr + row.to(tl.int64) * stride
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        hist = tl.zeros([RADIX], tl.int32)
        for c0 in range(start, end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            valid = cols < end
            z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
            digit = (_ordered(z) >> shift) - lo_d
            inside = valid & (digit >= 0) & (digit < RADIX)
            hist += tl.histogram(tl.where(inside, digit, 0), RADIX, mask=inside)
        tl.store(khist_ptr + (((step % 2) * B + row) * C + c) * RADIX + tl.arange(0, RADIX), hist)


@triton.jit(do_not_specialize=["step"])
def _topp_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, part_max_ptr, khist_ptr, kstate_ptr,
                 kfinal_ptr, pstate_ptr, pz_ptr, pacc_ptr, step, K_LAST: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, RADIX: tl.constexpr, NC: tl.constexpr):
    # grid (B, C), top-p step `step` (0..6). Step 0 first finishes top-k (applies digit 3 ->
    # the k-th largest raw logit z_k; top-k keeps key(x) >= kfinal = key(fl(z_k / T))), then
    # starts top-p on [kfinal, key(m) + 1), m the largest x. Every step then applies the
    # previous step's masses (pacc[(step-1) % 2]) to the row's interval [lo, hi) and sums
    # this chunk's mass exp(x - m) at NC candidates in it -> pacc[step % 2]. The mass at
    # candidate lo of step 0 is Z, the top-k set's mass (kept in pz from step 1 on).
    row = tl.program_id(0)
    c = tl.program_id(1)
    B = tl.num_programs(0)
    C = tl.num_programs(1)
    t, k, top_p, sampled, k_on, p_on = _row(temp_ptr, topk_ptr, topp_ptr, row, V)
    if p_on | (k_on & (step == 0)):                     # every other program returns at once
        _topp_step(logits_ptr, stride, V, part_max_ptr, khist_ptr, kstate_ptr, kfinal_ptr, pstate_ptr, pz_ptr,
                   pacc_ptr, step, row, c, B, C, t, k, top_p, k_on, p_on, K_LAST, CHUNK, BLOCK, BLOCK_C, RADIX, NC)


@triton.jit
def _topp_step(logits_ptr, stride, V, part_max_ptr, khist_ptr, kstate_ptr, kfinal_ptr, pstate_ptr, pz_ptr, pacc_ptr,
               step, row, c, B, C, t, k, top_p, k_on, p_on, K_LAST: tl.constexpr, CHUNK: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, RADIX: tl.constexpr, NC: tl.constexpr):
    cs = tl.arange(0, BLOCK_C)
    if step == 0:
        lo = tl.full([], -2147483648, tl.int64)
        if k_on:
            src = K_LAST % 2
            klo = tl.load(kstate_ptr + (src * B + row) * 2)
            kabove = tl.load(kstate_ptr + (src * B + row) * 2 + 1)
            klo, kabove = _radix_apply(khist_ptr + (src * B + row) * C * RADIX, C, klo, kabove, k, 0,
                                       BLOCK_C, RADIX)
            zk = _from_ordered(klo.to(tl.int32))
            lo = _ordered(tl.math.div_rn(zk, t)).to(tl.int64)
            if c == 0:
                tl.store(kfinal_ptr + row, lo)
        m = tl.math.div_rn(tl.max(tl.load(part_max_ptr + row * C + cs, mask=cs < C, other=float("-inf")), axis=0), t)
        hi = _ordered(m).to(tl.int64) + 1
    else:
        src = (step - 1) % 2
        lo = tl.load(pstate_ptr + (src * B + row) * 2)
        hi = tl.load(pstate_ptr + (src * B + row) * 2 + 1)
        m = tl.math.div_rn(tl.max(tl.load(part_max_ptr + row * C + cs, mask=cs < C, other=float("-inf")), axis=0), t)
        if hi - lo > 1:                                                 # (step >= 1: a top-p row)
            mass = tl.where(step > 1, tl.load(pz_ptr + row), -1.0)     # step 1: Z from step 0's masses
            lo, hi, mass = _topp_apply(pacc_ptr + (src * B + row) * C * NC, C, lo, hi, top_p, mass, BLOCK_C, NC)
            if (step == 1) & (c == 0):
                tl.store(pz_ptr + row, mass)
    if p_on:
        dst = step % 2
        if c == 0:
            tl.store(pstate_ptr + (dst * B + row) * 2, lo)
            tl.store(pstate_ptr + (dst * B + row) * 2 + 1, hi)
        if hi - lo > 1:
            j = tl.arange(0, NC)
            cand = (lo + (hi - lo) * j // NC).to(tl.int32)              # [NC], all in [lo, hi)
            base = logits_ptr + row.to(tl.int64) * stride
            start = c * CHUNK
            end = tl.minimum(start + CHUNK, V)
            acc = tl.zeros([NC, BLOCK], tl.float32)     # per-lane running sums, reduced once per chunk
            for c0 in range(start, end, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                valid = cols < end
                z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
                # a tile whose largest key is below lo adds nothing to any candidate: skip it
                if _ordered(tl.math.div_rn(tl.max(z, axis=0), t)).to(tl.int64) >= lo:
                    x = tl.math.div_rn(z, tl.zeros_like(z) + t)
                    hit = (_ordered(x)[None, :] >= cand[:, None]) & valid[None, :]
                    acc += tl.where(hit, tl.exp(x - m)[None, :], 0.0)
            tl.store(pacc_ptr + ((dst * B + row) * C + c) * NC + j, tl.sum(acc, axis=1))


@triton.jit
def _draw_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, seed_ptr, off_ptr, kfinal_ptr, pstate_ptr,
                 pz_ptr, pacc_ptr, thresh_ptr, g_score_ptr, g_idx_ptr, P_LAST: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, NC: tl.constexpr):
    # grid (B, C): the row's threshold (top-p: apply the last top-p step; else top-k's key;
    # else none) -> thresh[row], and Gumbel-max over chunk c's allowed tokens for rows with
    # top-k or top-p (the others were drawn by the first pass, or are greedy).
    row = tl.program_id(0)
    c = tl.program_id(1)
    B = tl.num_programs(0)
    C = tl.num_programs(1)
    t, k, top_p, sampled, k_on, p_on = _row(temp_ptr, topk_ptr, topp_ptr, row, V)
    thresh = tl.full([], -2147483648, tl.int64)
    if p_on:
        src = P_LAST % 2
        lo = tl.load(pstate_ptr + (src * B + row) * 2)
        hi = tl.load(pstate_ptr + (src * B + row) * 2 + 1)
        if hi - lo > 1:
            lo, hi, _ = _topp_apply(pacc_ptr + (src * B + row) * C * NC, C, lo, hi, top_p, tl.load(pz_ptr + row),
                                    BLOCK_C, NC)
        thresh = lo
    elif k_on:
        thresh = tl.load(kfinal_ptr + row)
    if c == 0:
        tl.store(thresh_ptr + row, thresh)
    if k_on | p_on:
        base = logits_ptr + row.to(tl.int64) * stride
        seed = tl.load(seed_ptr + row)
        step = tl.load(off_ptr + row).to(tl.int64)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        win = tl.full([], float("-inf"), tl.float32)
        win_i = start
        for c0 in range(start, end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            valid = cols < end
            z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
            score = _gumbel_tile(z, cols, valid, t, seed, step, thresh)
            sm, si = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            if sm > win:
                win = sm
                win_i = c0 + si
        tl.store(g_score_ptr + row * C + c, win)
        tl.store(g_idx_ptr + row * C + c, win_i)


@triton.jit
def _pick_kernel(temp_ptr, part_max_ptr, part_idx_ptr, g_score_ptr, g_idx_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    # grid (B,): the winning chunk (the lowest on ties) -> its token; greedy rows take the max logit
    row = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    if tl.load(temp_ptr + row) > 0:
        score = tl.load(g_score_ptr + row * C + cs, mask=cs < C, other=float("-inf"))
        _, best = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tok = tl.load(g_idx_ptr + row * C + best)
    else:
        score = tl.load(part_max_ptr + row * C + cs, mask=cs < C, other=float("-inf"))
        _, best = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tok = tl.load(part_idx_ptr + row * C + best)
    tl.store(out_ptr + row, tok.to(tl.int64))


def _chunk(b: int, v: int, device: torch.device) -> int:
    # ~4 programs per SM over the batch, chunks of >= 1024 tokens, at most 64 chunks a row
    # (each top-k step re-reads all of a row's [C, 256] histograms, in every program)
    per_row = max(1, min(64, triton.cdiv(4 * dispatch.sm_count(device), b)))
    return max(1024, triton.next_power_of_2(triton.cdiv(v, per_row)))


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor | None = None, chunk: int | None = None,
                  return_threshold: bool = False, filtered: bool = True):
    """Triton `sample_ref`: no sort, no host sync; each row is split over C vocabulary chunks.

    13 launches: the first pass (chunk maxima; the whole draw for rows without top-k/top-p;
    top-k digit 0), 3 top-k radix steps, 7 top-p steps (the first also finishes top-k), the
    draw (finishes top-p) and a pick over the chunks. `filtered=False` is the caller's
    promise that no row uses top-k or top-p (the engine knows it on the host): then 2
    launches, the first pass and the pick (rows that do have top-k/top-p are drawn without
    them). On CPU (Triton's interpreter) the launches nobody needs are skipped, which needs
    the flags on the host. `chunk`
    overrides the chunk width (tests); `return_threshold` also returns each row's threshold
    [B] int64 on the ordered-int32 key of x = logit / T (allowed = key(x) >= threshold, -0.0
    keyed as +0.0), for exactness tests.
    """
    if logits.ndim != 2 or logits.stride(-1) != 1:
        raise ValueError(f"sample: logits must be [B, V] with unit stride on V, got {tuple(logits.shape)}")
    b, v = logits.shape
    for name, tensor in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                         ("offsets", offsets)):
        if tensor is not None and tensor.shape != (b,):
            raise ValueError(f"sample: {name} must be [{b}], got {tuple(tensor.shape)}")
    dev = logits.device
    if offsets is None:
        offsets = torch.zeros_like(seeds)
    out = torch.empty(b, dtype=torch.int64, device=dev)
    if b == 0 or v == 0:
        thresh = torch.full((b,), INT32_MIN, dtype=torch.int64, device=dev)
        return (out, thresh) if return_threshold else out
    chunk = chunk or _chunk(b, v, dev)
    c = triton.cdiv(v, chunk)
    block_c = max(2, triton.next_power_of_2(c))
    temp = temperature.float().contiguous()
    tk, tp = top_k.int().contiguous(), top_p.float().contiguous()
    seeds, offsets = seeds.long().contiguous(), offsets.long().contiguous()
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    part_max, part_idx = torch.empty((b, c), dtype=f32, device=dev), torch.empty((b, c), dtype=i32, device=dev)
    g_score, g_idx = torch.empty((b, c), dtype=f32, device=dev), torch.empty((b, c), dtype=i32, device=dev)
    khist = torch.empty((2, b, c, RADIX), dtype=i32, device=dev)        # [parity, row, chunk, digit]
    kstate = torch.empty((2, b, 2), dtype=i64, device=dev)              # [parity, row, (lo, above)]
    kfinal = torch.empty(b, dtype=i64, device=dev)
    pstate = torch.empty((2, b, 2), dtype=i64, device=dev)              # [parity, row, (lo, hi)]
    pz = torch.empty(b, dtype=f32, device=dev)
    pacc = torch.empty((2, b, c, NC), dtype=f32, device=dev)
    thresh = torch.empty(b, dtype=i64, device=dev)
    k_steps, p_steps, draw = K_STEPS, P_STEPS, True
    if not filtered:
        k_steps, p_steps, draw = 0, 0, False
        if return_threshold:
            thresh.fill_(INT32_MIN)
    elif dev.type == "cpu":  # Triton's interpreter: the flags are on the host (no device sync to read them),
        # so skip the launches whose every program would return at once
        sampled = temp > 0
        any_k = bool((sampled & (tk > 0) & (tk < v)).any())
        any_p = bool((sampled & (tp < 1.0)).any())
        k_steps = K_STEPS if any_k else 0
        p_steps = P_STEPS if any_p else (1 if any_k else 0)
        draw = any_k or any_p
        if not draw:
            thresh.fill_(INT32_MIN)
    grid = (b, c)
    _first_kernel[grid](logits, logits.stride(0), v, temp, tk, tp, seeds, offsets, part_max, part_idx, g_score,
                        g_idx, khist, CHUNK=chunk, BLOCK=min(512, chunk), RADIX=RADIX,
                        UNFILTERED=not filtered, num_warps=4)
    for step in range(1, k_steps + 1):
        _topk_kernel[grid](logits, logits.stride(0), v, temp, tk, tp, khist, kstate, step, CHUNK=chunk,
                           BLOCK=min(1024, chunk), BLOCK_C=block_c, RADIX=RADIX, num_warps=4)
    for step in range(p_steps):
        _topp_kernel[grid](logits, logits.stride(0), v, temp, tk, tp, part_max, khist, kstate, kfinal, pstate, pz,
                           pacc, step, K_LAST=K_STEPS, CHUNK=chunk, BLOCK=min(128, chunk), BLOCK_C=block_c,
                           RADIX=RADIX, NC=NC, num_warps=4)
    if draw:
        _draw_kernel[grid](logits, logits.stride(0), v, temp, tk, tp, seeds, offsets, kfinal, pstate, pz, pacc,
                           thresh, g_score, g_idx, P_LAST=P_STEPS - 1, CHUNK=chunk, BLOCK=min(512, chunk),
                           BLOCK_C=block_c, NC=NC, num_warps=4)
    _pick_kernel[(b,)](temp, part_max, part_idx, g_score, g_idx, out, c, BLOCK_C=block_c, num_warps=1)
    return (out, thresh) if return_threshold else out


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so int64 never overflows
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons): a bijection on 32-bit words with full avalanche
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): [B, vocab] float64, a pure function of (seed, offset, column).

    No generator state and no host round trip, so a seeded request draws the same numbers
    on any batch position, and `offsets` (the step index) moves it to fresh numbers.
    """
    s, o = seeds.long()[:, None], offsets.long()[:, None]
    key = _hash32(_hash32(_hash32(_hash32((o >> 32) + 0x9E3779B9) ^ o) ^ (s >> 32)) ^ s)   # [B, 1]
    key2 = _hash32(key + 0x632BE5AB)
    col = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    bits = _hash32(_hash32(key ^ col) ^ key2) >> 9                    # 23 random bits
    return (bits.double() + 0.5) * 2.0**-23


def allowed_mask_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens a row may sample (temperature 0 rows are greedy instead).

    With x = logit / T: top-k keeps x >= the k-th largest x. top-p then takes the top-k set
    in descending x and keeps the shortest prefix whose softmax mass (renormalised over the
    top-k set) reaches top_p: token i is kept iff the mass of tokens with larger x is < top_p,
    so the top token always is. Both are thresholds on x, so tokens tied with the last kept
    one are kept too. top_k <= 0 or >= V and top_p >= 1 switch them off.
    """
    b, v = logits.shape
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0).float()[:, None]
    desc, order = x.sort(dim=-1, descending=True)
    k = top_k.long()
    k = torch.where((k <= 0) | (k > v), v, k)
    allowed = x >= desc.gather(1, (k - 1)[:, None])
    probs = torch.softmax(x.masked_fill(~allowed, float("-inf")), dim=-1).gather(1, order)   # in x order
    mass_before = probs.cumsum(-1) - probs                           # mass of the tokens before j
    n_keep = (mass_before < top_p.float()[:, None]).sum(-1).clamp(min=1)
    x_min = desc.gather(1, (n_keep - 1)[:, None])
    return allowed & ((x >= x_min) | (top_p.float() >= 1.0)[:, None])


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, offsets: torch.Tensor | None = None, filtered: bool = True) -> torch.Tensor:
    """logits[B,V] -> token ids [B] int64, one per row.

    temperature[B] f32 (0 = greedy argmax, ties to the lowest id), top_k[B] i32 (0 = off),
    top_p[B] f32 (1.0 = off), seeds[B] i64, offsets[B] i64 (step index; None = 0).
    Draws by the Gumbel-max trick: argmax over allowed tokens of logit/T - log(-log u),
    which samples exactly from softmax(logit/T) renormalised over the allowed set (see
    `allowed_mask_ref`). The uniforms come from `counter_uniform`; the Triton kernel uses
    Philox instead, so the two sides draw different (each reproducible, identically
    distributed) tokens for one seed. Reproducible per (seed, offset), whatever the row's
    position in the batch. Offsets are used modulo 2**32 by the Triton side.
    `filtered=False` promises that no row uses top-k/top-p: a launch hint for the Triton
    side (2 launches instead of 13), ignored here.
    """
    if offsets is None:
        offsets = torch.zeros_like(seeds)
    b, v = logits.shape
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0).float()[:, None]
    gumbel = -torch.log(-torch.log(counter_uniform(seeds, offsets, v)))
    allowed = allowed_mask_ref(logits, temperature, top_k, top_p)
    scores = (x.double() + gumbel).masked_fill(~allowed, float("-inf"))
    drawn = scores.argmax(-1)
    return torch.where(temperature > 0, drawn, logits.argmax(-1))
