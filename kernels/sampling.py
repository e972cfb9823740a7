"""Per-row sampling: temperature, top-k, top-p, seeded draw; greedy where temperature is 0.

Triton side, without a sort and without a host sync: the top-k and top-p sets are both
"x >= threshold" on x = logit / T, and each threshold is found exactly by an NC-ary search
over the order-preserving int32 key of x (counting tokens for top-k, summing softmax mass
for top-p). Each row is split into vocabulary chunks so the whole GPU works on one row;
the chunks agree on the search interval by re-reading each other's totals every step
(one launch per step). The draw is Gumbel-max per chunk, then the best chunk wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch

_M32 = 0xFFFFFFFF
NC = 32           # candidate thresholds counted per pass (an NC-ary search)
SEARCH_STEPS = 8  # 7 passes shrink a 2**32 key range to one key (32 -> 27 -> ... -> 2 -> 0 bits), +1 to apply


@triton.jit
def _ordered(x):
    # fp32 -> int32 with the same order (flip the magnitude bits of negatives)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _scaled(base, cols, end, t):
    # x = logit / T by IEEE division (fp32 `/` may be approximate on GPU): x is then
    # bit-identical with torch's, so the thresholds select exactly the reference's sets
    z = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(z, tl.zeros_like(z) + t)


@triton.jit(do_not_specialize=["step"])
def _search_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, part_max_ptr, part_idx_ptr, zpart_ptr,
                   state_ptr, kfinal_ptr, acc_ptr, B, C, step,
                   TOP_P: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                   NC: tl.constexpr):
    # grid (B, C): one step of the search for a row's threshold, over vocab chunk c.
    # The threshold is an ordered key of x = logit / T: the largest key K whose tokens
    # (key >= K) number >= top_k (TOP_P=False) or hold >= top_p of the top-k mass (TOP_P).
    # Step s first applies step s-1's per-chunk totals (acc[s % 2]) to the row's interval
    # [lo, hi) (state[s % 2]), then counts its chunk at NC candidates (acc[1 - s % 2]); every
    # program of a row applies the same totals, so they agree on the interval without a sync.
    row = tl.program_id(0)
    c = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride
    temp = tl.load(temp_ptr + row)
    t = tl.where(temp > 0, temp, 1.0)
    k = tl.load(topk_ptr + row)
    k_on = (temp > 0) & (k > 0) & (k < V)
    cols0 = tl.arange(0, BLOCK)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, V)
    src = step % 2
    dst = 1 - src
    j = tl.arange(0, NC)
    cs = tl.arange(0, BLOCK_C)

    if TOP_P:
        top_p = tl.load(topp_ptr + row)
        active = (temp > 0) & (top_p < 1.0)
    else:
        top_p = 1.0
        active = k_on
        if step == 0:                     # chunk max and its first index, for every row
            best = tl.full([], float("-inf"), tl.float32)
            best_i = start
            for c0 in range(start, end, BLOCK):
                cols = c0 + cols0
                z = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
                zm, zi = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
                if zm > best:
                    best = zm
                    best_i = c0 + zi
            tl.store(part_max_ptr + row * C + c, best)
            tl.store(part_idx_ptr + row * C + c, best_i)

    if active:
        top = tl.max(tl.load(part_max_ptr + row * C + cs, mask=cs < C, other=float("-inf")), axis=0)
        m = tl.math.div_rn(top, t)                                    # the largest x, exactly
        if step == 0:
            lo = tl.full([], -2147483648, tl.int64)
            hi = tl.full([], 2147483648, tl.int64)
            if TOP_P:
                if k_on:
                    lo = tl.load(kfinal_ptr + row * 2)                  # search up from the top-k key
                hi = _ordered(m).to(tl.int64) + 1
        else:
            lo = tl.load(state_ptr + (src * B + row) * 2)
            hi = tl.load(state_ptr + (src * B + row) * 2 + 1)
            if hi - lo > 1:
                cand = lo + (hi - lo) * j // NC
                part = tl.load(acc_ptr + ((src * B + row) * C + cs[:, None]) * NC + j[None, :],
                               mask=(cs < C)[:, None], other=0)
                total = tl.sum(part, axis=0)
                if TOP_P:
                    z = tl.sum(tl.load(zpart_ptr + row * C + cs, mask=cs < C, other=0.0), axis=0)
                    ok = total >= top_p * z
                else:
                    ok = total >= k
                lo = tl.max(tl.where(ok, cand, lo), axis=0)
                hi = tl.min(tl.where(ok, hi, cand), axis=0)
        if c == 0:
            tl.store(state_ptr + (dst * B + row) * 2, lo)
            tl.store(state_ptr + (dst * B + row) * 2 + 1, hi)
        if TOP_P:
            if step == 0:                 # the chunk's share of Z = sum over the top-k set of exp(x - m)
                zc = tl.zeros([BLOCK], tl.float32)
                for c0 in range(start, end, BLOCK):
                    cols = c0 + cols0
                    x = _scaled(base, cols, end, t)
                    zc += tl.where(_ordered(x).to(tl.int64) >= lo, tl.exp(x - m), 0.0)
                tl.store(zpart_ptr + row * C + c, tl.sum(zc, axis=0))
        if hi - lo > 1:
            cand = (lo + (hi - lo) * j // NC).to(tl.int32)               # [NC], all in [lo, hi)
            # [NC, BLOCK] running totals, reduced across lanes once per chunk (not per tile)
            if TOP_P:
                acc = tl.zeros([NC, BLOCK], tl.float32)
            else:
                acc = tl.zeros([NC, BLOCK], tl.int32)
            for c0 in range(start, end, BLOCK):
                cols = c0 + cols0
                x = _scaled(base, cols, end, t)
                hit = (_ordered(x)[None, :] >= cand[:, None]) & (cols < end)[None, :]
                if TOP_P:
                    acc += tl.where(hit, tl.exp(x - m)[None, :], 0.0)
                else:
                    acc += hit.to(tl.int32)
            tl.store(acc_ptr + ((dst * B + row) * C + c) * NC + j, tl.sum(acc, axis=1))


@triton.jit
def _gumbel_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, seed_ptr, off_ptr, kfinal_ptr, pfinal_ptr,
                   g_score_ptr, g_idx_ptr, thresh_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # grid (B, C): Gumbel-max over the allowed tokens (key(x) >= threshold) of chunk c.
    # Uniforms from Philox(seed, counter = (offset << 32) + column): a pure function of them.
    row = tl.program_id(0)
    c = tl.program_id(1)
    C = tl.num_programs(1)
    temp = tl.load(temp_ptr + row)
    if temp > 0:
        k = tl.load(topk_ptr + row)
        thresh = tl.full([], -2147483648, tl.int64)
        if (k > 0) & (k < V):
            thresh = tl.load(kfinal_ptr + row * 2)
        if tl.load(topp_ptr + row) < 1.0:
            thresh = tl.load(pfinal_ptr + row * 2)                     # searched from the top-k key up
        if c == 0:
            tl.store(thresh_ptr + row, thresh)
        base = logits_ptr + row.to(tl.int64) * stride
        seed = tl.load(seed_ptr + row)
        step = tl.load(off_ptr + row).to(tl.int64)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        win = tl.full([], float("-inf"), tl.float32)
        win_i = start
        for c0 in range(start, end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = _scaled(base, cols, end, temp)
            keep = (_ordered(x).to(tl.int64) >= thresh) & (cols < end)
            r = tl.randint(seed, (step << 32) + cols.to(tl.int64)).to(tl.uint32, bitcast=True)
            u = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07     # (0, 1), 23 bits, never 0 or 1
            score = tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))
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
    # ~4 programs per SM over the batch, chunks of >= 1024 tokens, at most 256 chunks a row
    sms = dispatch.sm_count(device)
    per_row = max(1, min(256, triton.cdiv(4 * sms, b)))
    return max(1024, triton.next_power_of_2(triton.cdiv(v, per_row)))


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor | None = None, chunk: int | None = None,
                  return_threshold: bool = False):
    """Triton `sample_ref`: no sort, no host sync; each row is split over C vocabulary chunks.

    Launches: 8 top-k search steps (the first also takes each chunk's max), 8 top-p search
    steps (the first also sums Z), a Gumbel-max per chunk, and a pick over the chunks. Rows
    without top-k/top-p return at once from the search steps. `chunk` overrides the chunk
    width (tests); `return_threshold` also returns each row's threshold [B] int64 on the
    ordered-int32 key of x = logit / T (allowed = key(x) >= threshold), for exactness tests.
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
    thresh = torch.full((b,), -2**31, dtype=torch.int64, device=dev)
    if b == 0 or v == 0:
        return (out, thresh) if return_threshold else out
    chunk = chunk or _chunk(b, v, dev)
    c = triton.cdiv(v, chunk)
    block_c = max(2, triton.next_power_of_2(c))
    temp = temperature.float().contiguous()
    tk, tp = top_k.int().contiguous(), top_p.float().contiguous()
    part_max = torch.empty((b, c), dtype=torch.float32, device=dev)
    part_idx = torch.empty((b, c), dtype=torch.int32, device=dev)
    zpart = torch.empty((b, c), dtype=torch.float32, device=dev)
    kstate = torch.empty((2, b, 2), dtype=torch.int64, device=dev)    # [parity, row, (lo, hi)]
    pstate = torch.empty((2, b, 2), dtype=torch.int64, device=dev)
    kacc = torch.empty((2, b, c, NC), dtype=torch.int32, device=dev)
    pacc = torch.empty((2, b, c, NC), dtype=torch.float32, device=dev)
    final = SEARCH_STEPS % 2                                           # the parity the last step writes
    kfinal, pfinal = kstate[final], pstate[final]
    steps = {False: SEARCH_STEPS, True: SEARCH_STEPS}
    if dev.type == "cpu":  # Triton's interpreter: the flags are on the host (no device sync to read
        # them), so skip the launches whose every program would return at once (step 0 takes the maxima)
        sampled = temp > 0
        steps[False] = SEARCH_STEPS if bool((sampled & (tk > 0) & (tk < v)).any()) else 1
        steps[True] = SEARCH_STEPS if bool((sampled & (tp < 1.0)).any()) else 0
    for top_p_pass, state, acc in ((False, kstate, kacc), (True, pstate, pacc)):
        for step in range(steps[top_p_pass]):
            _search_kernel[(b, c)](logits, logits.stride(0), v, temp, tk, tp, part_max, part_idx, zpart, state,
                                   kfinal, acc, b, c, step, TOP_P=top_p_pass, CHUNK=chunk,
                                   BLOCK=min(128, chunk), BLOCK_C=block_c, NC=NC, num_warps=4)
    g_score = torch.empty((b, c), dtype=torch.float32, device=dev)
    g_idx = torch.empty((b, c), dtype=torch.int32, device=dev)
    _gumbel_kernel[(b, c)](logits, logits.stride(0), v, temp, tk, tp, seeds.long().contiguous(),
                           offsets.long().contiguous(), kfinal, pfinal, g_score, g_idx, thresh,
                           CHUNK=chunk, BLOCK=min(512, chunk), num_warps=4)
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
               seeds: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """logits[B,V] -> token ids [B] int64, one per row.

    temperature[B] f32 (0 = greedy argmax, ties to the lowest id), top_k[B] i32 (0 = off),
    top_p[B] f32 (1.0 = off), seeds[B] i64, offsets[B] i64 (step index; None = 0).
    Draws by the Gumbel-max trick: argmax over allowed tokens of logit/T - log(-log u),
    which samples exactly from softmax(logit/T) renormalised over the allowed set (see
    `allowed_mask_ref`). The uniforms come from `counter_uniform`; the Triton kernel uses
    Philox instead, so the two sides draw different (each reproducible, identically
    distributed) tokens for one seed. Reproducible per (seed, offset), whatever the row's
    position in the batch. Offsets are used modulo 2**32 by the Triton side.
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
