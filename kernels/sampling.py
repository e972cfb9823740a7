"""Per-row sampling: temperature, top-k, top-p, seeded draw; greedy where temperature is 0."""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


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
