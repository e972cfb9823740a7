"""Per-row sampling: temperature, top-k, top-p, seeded draw; greedy where temperature is 0."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF


@triton.jit
def _ordered(x):
    # fp32 -> int32 with the same order (flip the magnitude bits of negatives)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, off_ptr, out_ptr, stride, V,
                   BLOCK: tl.constexpr, NC: tl.constexpr):
    # One program per row; the row is streamed in BLOCK tiles several times (it stays in L2).
    # Thresholds are found by bisection on the bit pattern of the value, so the allowed
    # set is exact (no sort): see `allowed_mask_ref` for the set's definition.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    temp = tl.load(temp_ptr + row)
    t = tl.where(temp > 0, temp, 1.0)
    cols0 = tl.arange(0, BLOCK)

    # pass 1: the max logit and its lowest index (greedy; the top of x = logit / t)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + cols0
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        zm, zi = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
        if zm > best:
            best = zm
            best_i = (c0 + zi).to(tl.int32)

    if temp <= 0:
        tl.store(out_ptr + row, best_i.to(tl.int64))
    else:
        m = best / t
        k = tl.load(topk_ptr + row)
        top_p = tl.load(topp_ptr + row)
        j = tl.arange(0, NC)
        # top-k: the largest ordered key K with count(key >= K) >= k is the k-th largest x.
        # NC-ary search: each pass over the row counts NC candidate keys at once.
        k_lo = tl.full([], -2147483648, tl.int64)
        if (k > 0) & (k < V):
            k_hi = _ordered(m).to(tl.int64) + 1                        # count(key >= hi) = 0 < k
            while k_hi - k_lo > 1:
                cand = (k_lo + (k_hi - k_lo) * j // NC).to(tl.int32)  # [NC], all in [lo, hi)
                cnt = tl.zeros([NC], tl.int32)
                for c0 in range(0, V, BLOCK):
                    cols = c0 + cols0
                    x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / t
                    hit = (_ordered(x)[None, :] >= cand[:, None]) & (cols < V)[None, :]
                    cnt += tl.sum(hit.to(tl.int32), axis=1)
                ok = cnt >= k
                k_lo = tl.max(tl.where(ok, cand.to(tl.int64), k_lo), axis=0)
                k_hi = tl.min(tl.where(ok, k_hi, cand.to(tl.int64)), axis=0)
        # top-p over the renormalised top-k distribution: the largest probability key P with
        # mass(prob key >= P) >= top_p; keep prob >= that (capped at the top token: >= 1 token)
        p_lo = tl.full([], 0, tl.int64)
        inv_z = tl.full([], 1.0, tl.float32)
        if top_p < 1.0:
            z_sum = tl.zeros([], tl.float32)
            for c0 in range(0, V, BLOCK):
                cols = c0 + cols0
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / t
                keep = (_ordered(x).to(tl.int64) >= k_lo) & (cols < V)
                z_sum += tl.sum(tl.where(keep, tl.exp(x - m), 0.0), axis=0)
            inv_z = 1.0 / z_sum
            p_top = _ordered(tl.full([], 1.0, tl.float32) * inv_z).to(tl.int64)   # the top token's prob
            p_hi = p_top + 1
            while p_hi - p_lo > 1:
                cand = (p_lo + (p_hi - p_lo) * j // NC).to(tl.int32)
                mass = tl.zeros([NC], tl.float32)
                for c0 in range(0, V, BLOCK):
                    cols = c0 + cols0
                    x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / t
                    prob = tl.where((_ordered(x).to(tl.int64) >= k_lo) & (cols < V), tl.exp(x - m) * inv_z, 0.0)
                    hit = _ordered(prob)[None, :] >= cand[:, None]
                    mass += tl.sum(tl.where(hit, prob[None, :], 0.0), axis=1)
                ok = mass >= top_p
                p_lo = tl.max(tl.where(ok, cand.to(tl.int64), p_lo), axis=0)
                p_hi = tl.min(tl.where(ok, p_hi, cand.to(tl.int64)), axis=0)
            p_lo = tl.minimum(p_lo, p_top)

        # last pass: Gumbel-max over the allowed tokens, uniforms from Philox(seed, (offset, column))
        seed = tl.load(seed_ptr + row)
        step = tl.load(off_ptr + row).to(tl.int64)
        win = tl.full([], float("-inf"), tl.float32)
        win_i = best_i
        for c0 in range(0, V, BLOCK):
            cols = c0 + cols0
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / t
            keep = (_ordered(x).to(tl.int64) >= k_lo) & (cols < V)
            if top_p < 1.0:
                keep = keep & (_ordered(tl.exp(x - m) * inv_z).to(tl.int64) >= p_lo)
            r = tl.randint(seed, (step << 32) + cols.to(tl.int64)).to(tl.uint32, bitcast=True)
            u = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07     # (0, 1), 23 bits, never 0 or 1
            score = tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))
            sm, si = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            if sm > win:
                win = sm
                win_i = (c0 + si).to(tl.int32)
        tl.store(out_ptr + row, win_i.to(tl.int64))


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """Triton `sample_ref`: one launch, no sort, no host sync. `block` overrides the tile width (tests)."""
    if logits.ndim != 2 or logits.stride(-1) != 1:
        raise ValueError(f"sample: logits must be [B, V] with unit stride on V, got {tuple(logits.shape)}")
    b, v = logits.shape
    for name, tensor in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                         ("offsets", offsets)):
        if tensor is not None and tensor.shape != (b,):
            raise ValueError(f"sample: {name} must be [{b}], got {tuple(tensor.shape)}")
    if offsets is None:
        offsets = torch.zeros_like(seeds)
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        block = block or min(triton.next_power_of_2(v), 1024)
        _sample_kernel[(b,)](logits, temperature.float().contiguous(), top_k.int().contiguous(),
                             top_p.float().contiguous(), seeds.long().contiguous(), offsets.long().contiguous(), out,
                             logits.stride(0), v, BLOCK=block, NC=16, num_warps=8 if block >= 2048 else 4)
    return out


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
    """[B, V] bool: the tokens a row may sample (ignores temperature 0; greedy is separate).

    top-k keeps logits >= the k-th largest (ties at the boundary are all kept); top-p then
    keeps, of the renormalised top-k distribution, every token whose probability is >= the
    smallest one in the shortest sorted prefix with cumulative mass >= top_p (so at least
    one token, and again ties kept). top_k <= 0 or >= V and top_p >= 1 switch them off.
    """
    b, v = logits.shape
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0).float()[:, None]
    desc = x.sort(dim=-1, descending=True).values
    k = top_k.long()
    k = torch.where((k <= 0) | (k > v), v, k)
    allowed = x >= desc.gather(1, (k - 1)[:, None])
    probs = torch.softmax(x.masked_fill(~allowed, float("-inf")), dim=-1)
    sp = probs.sort(dim=-1, descending=True).values
    mass_before = sp.cumsum(-1) - sp                                   # mass strictly before j
    n_keep = (mass_before < top_p.float()[:, None]).sum(-1).clamp(min=1)
    thresh = sp.gather(1, (n_keep - 1)[:, None])
    return allowed & ((probs >= thresh) | (top_p.float() >= 1.0)[:, None])


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """logits[B,V] -> token ids [B] int64, one per row.

    temperature[B] f32 (0 = greedy argmax, ties to the lowest id), top_k[B] i32 (0 = off),
    top_p[B] f32 (1.0 = off), seeds[B] i64, offsets[B] i64 (step index; None = 0).
    Draws by the Gumbel-max trick: argmax over allowed tokens of logit/T - log(-log u),
    which samples exactly from softmax(logit/T) renormalised over the allowed set. The
    uniforms come from `counter_uniform`; the Triton kernel uses Philox instead, so the two
    sides draw different (each reproducible, identically distributed) tokens for a seed.
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
