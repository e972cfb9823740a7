"""Logits processing before the sampler: logit_bias, repetition/frequency/presence penalties, min_p.

Order of operations (one place; vLLM v1's sampler runs the same order):

    logit_bias -> repetition -> frequency -> presence -> | temperature -> min_p -> top-k -> top-p -> draw
    (this module, in place on the fp32 logits)            | (min_p here, on x = logit / T; the rest in `sampling`)

Greedy rows (T = 0) get bias and penalties too (so does vLLM); min_p is skipped for them,
and could not change their token anyway: the largest x always passes its own threshold.

Per row b (every value is per row; its "off" value switches that knob off for the row):
- logit_bias: z[ids[b, j]] += values[b, j] for ids in [0, V) (-1 pads; others are ignored).
  A map, so ids are distinct; a repeated id is added twice (atomically on the Triton side,
  in either order: the one case where the two sides may differ, by a rounding).
- repetition p (1.0 = off; HF / vLLM): for a token seen in the prompt OR the output,
  z > 0 -> z / p, else z * p (so p > 1 discourages repeats whatever the sign).
- frequency f, presence r (0.0 = off; OpenAI): z -= f * count; then z -= r * (count > 0), with
  `count` the token's occurrences in the OUTPUT so far. Two subtractions, as vLLM writes them.
- min_p m (0.0 = off): keep x >= x_max + ln(min(m, 1)) with x = fl(z / T), i.e. p >= m * p_max
  in log space (vLLM compares softmax probabilities; the sets differ only within fp32 rounding
  at the boundary). Dropped tokens become -inf, so the sampler's top-k/top-p then work on the
  min_p set: top-k keeps the smaller of the two prefixes and top-p renormalises its mass over
  their intersection -- vLLM's order (min_p before top-k/top-p). Ties at the threshold are kept.
  Pass the sampler's own temperature tensor. min_p lives here rather than in `sampling`
  because there it would change three of the sampler's exact-set kernels (its first pass
  draws the rows without top-k/top-p in the same pass that finds their max, before any
  threshold is known); here it costs one launch and one more read of the rows using it,
  and the sampler already handles -inf logits.
  For the engine: a row's -inf are min_p's (or a grammar mask's) doing, so test the logits
  for NaN / inf BEFORE this step (the step loop's `isfinite(logits)` check), not after.
  Logits that come in as -inf (the engine masks a grammar's forbidden tokens first) stay
  -inf through bias and penalties and never win the max, so min_p is then relative to the
  most likely token still allowed.

Token state (what the engine keeps per sequence). One int32 tensor `token_state` [N, V]
for N sequence state rows: bits 0..29 count the token in the output so far, bit 30
(`PROMPT_SEEN`) marks it as seen in the prompt; `state_rows` [B] maps logits row b to its
state row (-1: no state, the three penalties are off for that row). Why this layout:
- per decode step the engine adds one count per sampled row (`add_output_tokens`: a single
  scatter_add of B elements, no host sync); a row is (re)built only at admission
  (`init_token_row`), so nothing is rebuilt per step. vLLM's older path rebuilt [B, V]
  bincounts from padded prompt and output id lists every step (a zero fill + scatter over
  growing lists); its newer GPU runner keeps a persistent int32 count tensor like this one
  plus a separate prompt bitmask.
- the kernel reads one 4-byte word per token for all three penalties: the prompt flag
  folded into the count word saves the second tensor and its load, and costs no range
  (2**30 output tokens). A sparse per-sequence list of (id, count) would touch fewer
  tokens but needs dedup and search on the device, or a host rebuild each step.
- rows are indexed through `state_rows`, so the batch order may change every step and
  only sequences that use a penalty need a row: memory is N * V * 4 bytes
  (e.g. 64 rows x 128256 = 33 MB).

Triton side: no host sync and no sort. Launches, all decided on the host from which
arguments are given (the engine knows which knobs any request uses): (1) bias, grid (B,),
atomic adds at the listed ids; (2) penalties, grid (B, C) over vocabulary chunks, one read
of the logits and of the state row and one write, plus each chunk's max logit for min_p;
(3) min_p, grid (B, C): x_max from the chunk maxima, then -inf where x < threshold.
Programs of rows with nothing to do return at once. Both sides are bit-identical: the
same fp32 operations in the same order, IEEE division (`div_rn`), no FMA contraction
(`enable_fp_fusion=False`), and ln(min_p) computed once by torch for both.

`logprobs_ref` (OpenAI `logprobs` / `top_logprobs`) lives here because it reads the same
logits at the same moment: log_softmax over the RAW model logits (vLLM's default), so it
must be taken before `apply_penalties_*`, which works in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dispatch

PROMPT_SEEN = 1 << 30            # token_state flag: the token occurs in the prompt
COUNT_MASK = PROMPT_SEEN - 1     # token_state bits 0..29: occurrences in the output so far


@triton.jit
def _bias_kernel(logits_ptr, stride, V, ids_ptr, vals_ptr, K, BLOCK_K: tl.constexpr):
    # grid (B,): logits[row, ids[row, j]] += vals[row, j] for ids in [0, V)
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * K + j, mask=j < K, other=-1)
    vals = tl.load(vals_ptr + row * K + j, mask=j < K, other=0.0)
    ok = (ids >= 0) & (ids < V)
    tl.atomic_add(logits_ptr + row.to(tl.int64) * stride + tl.where(ok, ids, 0), vals, mask=ok, sem="relaxed")


@triton.jit
def _penalty_kernel(logits_ptr, stride, V, state_ptr, state_stride, rows_ptr, rep_ptr, freq_ptr, pres_ptr,
                    temp_ptr, logp_ptr, part_max_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_STATE: tl.constexpr, HAS_MIN_P: tl.constexpr):
    # grid (B, C), chunk c of row b: repetition, frequency, presence (in place) where the row
    # has a state row and a penalty on; the chunk's max processed logit -> part_max (min_p rows)
    row = tl.program_id(0)
    c = tl.program_id(1)
    C = tl.num_programs(1)
    pen_on = False
    if HAS_STATE:
        srow = tl.load(rows_ptr + row)
        rep = tl.load(rep_ptr + row)
        freq = tl.load(freq_ptr + row)
        pres = tl.load(pres_ptr + row)
        pen_on = (srow >= 0) & ((rep != 1.0) | (freq != 0.0) | (pres != 0.0))
    mp_on = False
    if HAS_MIN_P:
        mp_on = (tl.load(temp_ptr + row) > 0) & (tl.load(logp_ptr + row) > float("-inf"))
    if pen_on | mp_on:
        base = logits_ptr + row.to(tl.int64) * stride
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        best = tl.full([], float("-inf"), tl.float32)
        for c0 in range(start, end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            valid = cols < end
            z = tl.load(base + cols, mask=valid, other=float("-inf"))
            if HAS_STATE:                                             # (static: srow exists)
                if pen_on:
                    s = tl.load(state_ptr + srow.to(tl.int64) * state_stride + cols, mask=valid, other=0)
                    cnt = s & 0x3FFFFFFF                              # COUNT_MASK
                    pen = tl.where(s != 0, rep, 1.0)                  # seen in the prompt or the output
                    z = tl.where(z > 0, tl.math.div_rn(z, pen), z * pen)
                    z = z - freq * cnt.to(tl.float32)
                    z = z - pres * (cnt > 0).to(tl.float32)
                    tl.store(base + cols, z, mask=valid)
            best = tl.maximum(best, tl.max(tl.where(valid, z, float("-inf")), axis=0))
        if mp_on:
            tl.store(part_max_ptr + row * C + c, best)


@triton.jit
def _min_p_kernel(logits_ptr, stride, V, temp_ptr, logp_ptr, part_max_ptr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (B, C): x_max = fl(max z / T) over the row's chunk maxima (division by T > 0 is
    # monotone, so this is the max of x); z = -inf where fl(z / T) < x_max + ln(min_p)
    row = tl.program_id(0)
    c = tl.program_id(1)
    C = tl.num_programs(1)
    t = tl.load(temp_ptr + row)
    logp = tl.load(logp_ptr + row)
    if (t > 0) & (logp > float("-inf")):
        cs = tl.arange(0, BLOCK_C)
        zmax = tl.max(tl.load(part_max_ptr + row * C + cs, mask=cs < C, other=float("-inf")), axis=0)
        thresh = tl.math.div_rn(zmax, t) + logp
        base = logits_ptr + row.to(tl.int64) * stride
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, V)
        for c0 in range(start, end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            valid = cols < end
            z = tl.load(base + cols, mask=valid, other=0.0)
            drop = valid & (tl.math.div_rn(z, tl.zeros_like(z) + t) < thresh)
            tl.store(base + cols, tl.full([BLOCK], float("-inf"), tl.float32), mask=drop)


def _chunk(b: int, v: int, device: torch.device) -> int:
    # ~4 programs per SM over the batch, chunks of >= 1024 tokens, <= 64 chunks a row
    # (the min_p pass reads all of a row's chunk maxima in every program)
    per_row = max(1, min(64, triton.cdiv(4 * dispatch.sm_count(device), b)))
    return max(1024, triton.next_power_of_2(triton.cdiv(v, per_row)))


def _check(logits, temperature, min_p, token_state, state_rows, repetition, frequency, presence, bias_ids,
           bias_values):
    # shapes only (no values: reading them would sync with the device)
    if logits.ndim != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"apply_penalties: logits must be fp32 [B, V] with unit stride on V, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    b, v = logits.shape
    for name, t in (("temperature", temperature), ("min_p", min_p), ("state_rows", state_rows),
                    ("repetition", repetition), ("frequency", frequency), ("presence", presence)):
        if t is not None and t.shape != (b,):
            raise ValueError(f"apply_penalties: {name} must be [{b}], got {tuple(t.shape)}")
    if (min_p is None) != (temperature is None):
        raise ValueError("apply_penalties: min_p and temperature go together (min_p works on logit / T)")
    has_pen = any(t is not None for t in (repetition, frequency, presence))
    if has_pen and token_state is None:
        raise ValueError("apply_penalties: repetition/frequency/presence need token_state [N, V] int32")
    if token_state is not None:
        if token_state.ndim != 2 or token_state.shape[1] != v or token_state.dtype != torch.int32 \
                or token_state.stride(1) != 1:
            raise ValueError(f"apply_penalties: token_state must be int32 [N, {v}] with unit stride on V, got "
                             f"{token_state.dtype} {tuple(token_state.shape)}")
        if state_rows is None and token_state.shape[0] < b:
            raise ValueError(f"apply_penalties: without state_rows, token_state needs >= {b} rows (row b -> b), "
                             f"got {token_state.shape[0]}")
    if (bias_ids is None) != (bias_values is None):
        raise ValueError("apply_penalties: bias_ids and bias_values go together")
    if bias_ids is not None and (bias_ids.ndim != 2 or bias_ids.shape[0] != b or bias_values.shape != bias_ids.shape):
        raise ValueError(f"apply_penalties: bias_ids and bias_values must both be [{b}, K], got "
                         f"{tuple(bias_ids.shape)} and {tuple(bias_values.shape)}")
    return has_pen


def _log_min_p(min_p: torch.Tensor) -> torch.Tensor:
    # ln(min(min_p, 1)) by torch, shared by both sides so their thresholds are bit-identical;
    # 0 -> -inf (off); min_p > 1 would drop every token, so it acts as 1 (keep the max's ties)
    return torch.log(min_p.float().clamp(max=1.0))


def apply_penalties_triton(logits: torch.Tensor, *, temperature: torch.Tensor | None = None,
                           min_p: torch.Tensor | None = None, token_state: torch.Tensor | None = None,
                           state_rows: torch.Tensor | None = None, repetition: torch.Tensor | None = None,
                           frequency: torch.Tensor | None = None, presence: torch.Tensor | None = None,
                           bias_ids: torch.Tensor | None = None, bias_values: torch.Tensor | None = None,
                           chunk: int | None = None) -> torch.Tensor:
    """Triton `apply_penalties_ref`: in place on `logits`, which it returns; no host sync.

    Up to 3 launches, chosen by which arguments are given: bias (grid B), penalties and
    chunk maxima (grid B x C), min_p (grid B x C). An argument left None switches its knob
    off for every row and skips its work. `chunk` overrides the chunk width (tests).
    """
    has_pen = _check(logits, temperature, min_p, token_state, state_rows, repetition, frequency, presence,
                     bias_ids, bias_values)
    b, v = logits.shape
    if b == 0 or v == 0:
        return logits
    dev = logits.device
    if bias_ids is not None and bias_ids.shape[1] > 0:
        k = bias_ids.shape[1]
        _bias_kernel[(b,)](logits, logits.stride(0), v, bias_ids.to(torch.int32).contiguous(),
                           bias_values.float().contiguous(), k, BLOCK_K=max(16, triton.next_power_of_2(k)),
                           num_warps=1, enable_fp_fusion=False)
    has_min_p = min_p is not None
    if not (has_pen or has_min_p):
        return logits
    chunk = chunk or _chunk(b, v, dev)
    c = triton.cdiv(v, chunk)
    f32 = torch.float32
    if has_pen:
        rows = (torch.arange(b, dtype=torch.int32, device=dev) if state_rows is None
                else state_rows.to(torch.int32).contiguous())
        rep = (repetition.float().contiguous() if repetition is not None
               else torch.ones(b, dtype=f32, device=dev))
        freq = frequency.float().contiguous() if frequency is not None else torch.zeros(b, dtype=f32, device=dev)
        pres = presence.float().contiguous() if presence is not None else torch.zeros(b, dtype=f32, device=dev)
        state, state_stride = token_state, token_state.stride(0)
    else:
        rows = rep = freq = pres = state = logits        # unused (HAS_STATE=False)
        state_stride = 0
    if has_min_p:
        temp, logp = temperature.float().contiguous(), _log_min_p(min_p).contiguous()
        part_max = torch.empty((b, c), dtype=f32, device=dev)
    else:
        temp = logp = part_max = logits                  # unused (HAS_MIN_P=False)
    grid = (b, c)
    _penalty_kernel[grid](logits, logits.stride(0), v, state, state_stride, rows, rep, freq, pres, temp, logp,
                          part_max, CHUNK=chunk, BLOCK=min(1024, chunk), HAS_STATE=has_pen, HAS_MIN_P=has_min_p,
                          num_warps=4, enable_fp_fusion=False)
    if has_min_p:
        _min_p_kernel[grid](logits, logits.stride(0), v, temp, logp, part_max, CHUNK=chunk, BLOCK=min(1024, chunk),
                            BLOCK_C=max(2, triton.next_power_of_2(c)), num_warps=4, enable_fp_fusion=False)
    return logits


def apply_penalties_ref(logits: torch.Tensor, *, temperature: torch.Tensor | None = None,
                        min_p: torch.Tensor | None = None, token_state: torch.Tensor | None = None,
                        state_rows: torch.Tensor | None = None, repetition: torch.Tensor | None = None,
                        frequency: torch.Tensor | None = None, presence: torch.Tensor | None = None,
                        bias_ids: torch.Tensor | None = None, bias_values: torch.Tensor | None = None,
                        chunk: int | None = None) -> torch.Tensor:
    """logit_bias, repetition, frequency, presence, then min_p on logits [B, V] fp32, IN PLACE; returns logits.

    Every knob is per row, None = off for all rows (see the module docstring for the order
    and formulas):
      bias_ids [B, K] int (-1 pads), bias_values [B, K] f32     logit_bias, added first
      token_state [N, V] int32, state_rows [B] int in [-1, N) (None: row b -> state row b; -1: no state)
      repetition [B] f32 (1.0 off), frequency [B] f32 (0 off), presence [B] f32 (0 off)
      temperature [B] f32, min_p [B] f32 (0 off; also off where T <= 0, i.e. greedy)
    Tokens min_p drops become -inf. `chunk` is the Triton side's tiling, ignored here.
    """
    has_pen = _check(logits, temperature, min_p, token_state, state_rows, repetition, frequency, presence,
                     bias_ids, bias_values)
    b, v = logits.shape
    if b == 0 or v == 0:
        return logits
    dev = logits.device
    if bias_ids is not None and bias_ids.shape[1] > 0:
        ids = bias_ids.long()
        ok = (ids >= 0) & (ids < v)
        # padding adds -0.0 at id 0: z + -0.0 == z for every z (+-0.0 included), and no
        # boolean indexing, which would sync with the device
        logits.scatter_add_(1, torch.where(ok, ids, 0), torch.where(ok, bias_values.float(), -0.0))
    if has_pen:
        srow = torch.arange(b, device=dev) if state_rows is None else state_rows.long()
        s = token_state[srow.clamp(min=0)]                                  # [B, V] (a copy)
        rep = repetition.float() if repetition is not None else torch.ones(b, device=dev)
        freq = frequency.float() if frequency is not None else torch.zeros(b, device=dev)
        pres = presence.float() if presence is not None else torch.zeros(b, device=dev)
        on = (srow >= 0) & ((rep != 1.0) | (freq != 0.0) | (pres != 0.0))
        cnt = s & COUNT_MASK
        pen = torch.where(s != 0, rep[:, None], 1.0)
        z = torch.where(logits > 0, logits / pen, logits * pen)
        z = z - freq[:, None] * cnt.float()
        z = z - pres[:, None] * (cnt > 0).float()
        logits.copy_(torch.where(on[:, None], z, logits))
    if min_p is not None:
        t = temperature.float()
        logp = _log_min_p(min_p)
        x = logits / torch.where(t > 0, t, 1.0)[:, None]
        thresh = x.max(-1).values + logp
        on = (t > 0) & (logp > float("-inf"))
        logits.masked_fill_(on[:, None] & (x < thresh[:, None]), float("-inf"))
    return logits


def new_token_state(rows: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed `token_state` [rows, vocab] int32 (see the module docstring)."""
    return torch.zeros((rows, vocab), dtype=torch.int32, device=device)


def init_token_row(token_state: torch.Tensor, row: int, prompt_ids: torch.Tensor,
                   output_ids: torch.Tensor | None = None) -> None:
    """(Re)build state row `row`: PROMPT_SEEN at the prompt's ids, counts of `output_ids` (after a
    recompute, the tokens generated so far; None at admission). Device ops; no host sync once the ids
    are on the device."""
    r = token_state[row]
    r.zero_()
    r.index_fill_(0, prompt_ids.to(device=r.device, dtype=torch.long), PROMPT_SEEN)
    if output_ids is not None and output_ids.numel():
        out = output_ids.to(device=r.device, dtype=torch.long)
        r.index_add_(0, out, torch.ones_like(out, dtype=torch.int32))


def add_output_tokens(token_state: torch.Tensor, state_rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """Count one sampled token per logits row: token_state[state_rows[b], tokens[b]] += 1.

    Rows with state_rows[b] < 0 are skipped (they add 0 to row 0), so the sampler's output
    goes in as it is: one scatter_add, no host sync. Call after every step that samples,
    before the next step's `apply_penalties`.
    """
    assert token_state.is_contiguous() and tokens.shape == state_rows.shape
    rows = state_rows.long()
    flat = rows.clamp(min=0) * token_state.shape[1] + tokens.long()
    token_state.view(-1).scatter_add_(0, flat, (rows >= 0).to(torch.int32))


def logprobs_ref(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int):
    """OpenAI `logprobs` / `top_logprobs` from the RAW logits [B, V] (before bias and penalties).

    -> (logprob of token_ids[b] [B] f32, top_n ids [B, top_n] int64, their logprobs [B, top_n] f32),
    log_softmax in fp32; the top ids in descending logprob (order among exact ties unspecified).
    Plain torch ops with no host sync, so it is also the GPU path (no Triton kernel needed).
    As z - logsumexp(z) on the picked entries only: no [B, V] log-softmax copy, which matters
    when B is every position of a scored prompt (a third less time, half the memory). A NaN
    or +inf anywhere in a row makes its logsumexp, so its chosen logprob, non-finite.
    """
    if logits.ndim != 2 or token_ids.shape != (logits.shape[0],):
        raise ValueError(f"logprobs: logits must be [B, V] and token_ids [B], got {tuple(logits.shape)} and "
                         f"{tuple(token_ids.shape)}")
    if not 0 <= top_n <= logits.shape[1]:
        raise ValueError(f"logprobs: top_n must be in [0, {logits.shape[1]}], got {top_n}")
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)                                      # [B]
    chosen = z.gather(1, token_ids.long()[:, None])[:, 0] - lse
    top_z, top_ids = z.topk(top_n, dim=-1)                                # order of z is the order of z - lse
    return chosen, top_ids, top_z - lse[:, None]
