"""apply_penalties (logit_bias, repetition/frequency/presence, min_p), its token state, logprobs_ref.

Triton against the reference: bit-identical (`torch.equal`), not within a tolerance. Both
sides do the same fp32 operations in the same order: IEEE division (`div_rn` / torch's
`/`), no FMA contraction (the launches pass `enable_fp_fusion=False`), ln(min_p) computed by
torch once for both, and the row max taken before the one division by T (monotone, so
fl(max z / T) is the max of fl(z / T)). So min_p sets, ties at the threshold included, are
the same sets. The reference against a naive per-token Python loop of the OpenAI / HF /
vLLM formulas in float64: close to fp32 rounding (rtol 1e-6 of the logit's size), with the
test data checked to keep every probability ratio at least 1e-4 away from min_p, so the
min_p sets are compared exactly.
"""

import math
import os
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports Triton, which reads it at import
from slotserve.kernels.testing import interpreter_ready  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_ready(), reason="Triton imported before "
                                "TRITON_INTERPRET=1; run in a fresh process by test_kernels_interpreter.py")
from slotserve.kernels import penalties as P  # noqa: E402
from slotserve.kernels import sampling  # noqa: E402

SIDES = {"triton": P.apply_penalties_triton, "ref": P.apply_penalties_ref}
NEG_INF = float("-inf")

# per-row knobs, cycled over a batch: (T, min_p, repetition, frequency, presence, logit_bias on)
ROWS = [
    (1.0, 0.0, 1.0, 0.0, 0.0, False),     # every knob off
    (0.8, 0.0, 1.3, 0.0, 0.0, False),     # repetition > 1 (discourages, either sign)
    (1.0, 0.0, 0.7, 0.0, 0.0, False),     # repetition < 1 (encourages)
    (1.2, 0.0, 1.0, 0.5, 0.3, False),     # frequency + presence
    (1.0, 0.0, 1.0, -0.4, -0.2, False),   # negative frequency / presence (encourage)
    (0.7, 0.1, 1.2, 0.2, 0.1, True),      # everything at once
    (1.5, 0.3, 1.0, 0.0, 0.0, False),     # min_p only
    (0.0, 0.5, 1.1, 0.0, 0.2, True),      # greedy: bias and penalties apply, min_p does not
]


def _case(b, v, seed, no_state_row=None):
    """-> (logits [b, v], kwargs for apply_penalties, per-row (prompt, output, bias dict, knobs)).

    Logits mix signs, exact zeros of both signs, ties and a -inf; prompts and outputs use ids 0
    and v-1; state rows are a permutation of a larger table; `no_state_row` gets state -1."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g) * 3
    logits[:, 1::9] = torch.round(logits[:, 1::9])               # ties and exact zeros
    logits[:, 2] = -0.0
    logits[:, 3] = 0.0
    logits[:, v // 2] = NEG_INF
    n = b + 3
    state = P.new_token_state(n, v, "cpu")
    perm = torch.randperm(n, generator=g)[:b]
    rows, per_row = [], []
    k = 4
    bias_ids = torch.full((b, k), -1, dtype=torch.int64)
    bias_vals = torch.zeros(b, k)
    for i in range(b):
        t, mp, rep, freq, pres, bias_on = ROWS[i % len(ROWS)]
        prompt = [0, v - 1] + torch.randint(0, v, (6,), generator=g).tolist()
        output = [v - 1, 5, 5, 5] + torch.randint(0, v, (5,), generator=g).tolist()
        bias = {}
        if bias_on:
            bias = {0: 100.0, v - 1: -100.0, 5: 2.5}
            for j, (tok, val) in enumerate(bias.items()):
                bias_ids[i, j], bias_vals[i, j] = tok, val
        P.init_token_row(state, int(perm[i]), torch.tensor(prompt))
        for tok in output:
            P.add_output_tokens(state, perm[i:i + 1], torch.tensor([tok]))
        rows.append(-1 if i == no_state_row else int(perm[i]))
        per_row.append((prompt, output, bias, (t, mp, rep, freq, pres)))
    knobs = torch.tensor([ROWS[i % len(ROWS)][:5] for i in range(b)], dtype=torch.float32)
    kw = dict(temperature=knobs[:, 0], min_p=knobs[:, 1], token_state=state,
              state_rows=torch.tensor(rows, dtype=torch.int32), repetition=knobs[:, 2], frequency=knobs[:, 3],
              presence=knobs[:, 4], bias_ids=bias_ids, bias_values=bias_vals)
    return logits, kw, per_row


def _to(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("b,v,chunk", [(8, 300, 64), (1, 37, None), (3, 1000, 128)])
def test_triton_matches_reference_bit_for_bit(b, v, chunk):
    # Mixed rows over several chunks (300 = 4 full chunks + a tail of 44; 37: one masked tile)
    if b == 1:                                     # B=1: the row with every knob on
        logits, kw, _ = _case(6, v, seed=7)
        logits, kw = logits[5:6], {k: (t if k == "token_state" else t[5:6]) for k, t in kw.items()}
    else:
        logits, kw, _ = _case(b, v, seed=b * 1000 + v, no_state_row=2)
    x, kw = logits.to(DEVICE), _to(kw, DEVICE)
    want = P.apply_penalties_ref(x.clone(), **kw)
    padded = torch.full((b, v + 5), 7.0, device=DEVICE)
    got_in = padded[:, :v]                         # rows strided by v + 5, as a view of a wider buffer
    got_in.copy_(x)
    got = P.apply_penalties_triton(got_in, chunk=chunk, **kw)
    assert got is got_in and (padded[:, v:] == 7.0).all()         # in place, nothing past a row's end
    assert torch.equal(got, want)                  # -inf where min_p dropped, on both sides
    assert torch.equal(torch.signbit(got), torch.signbit(want))   # even the sign of zeros
    if b == 8:
        assert torch.equal(got[0], x[0])           # every knob off: untouched
        assert torch.equal(got[2], x[2])           # repetition set, but the row has no state (-1)
        assert torch.isinf(got[6]).sum() > torch.isinf(x[6]).sum()   # min_p dropped something


@pytest.mark.parametrize("knobs", ["bias", "penalties", "min_p", "none"])
def test_each_knob_alone_and_only_its_launches(knobs, monkeypatch):
    logits, kw, _ = _case(5, 200, seed=11)
    keep = {"bias": ("bias_ids", "bias_values"), "penalties": ("token_state", "state_rows", "repetition",
                                                              "frequency", "presence"),
            "min_p": ("temperature", "min_p"), "none": ()}[knobs]
    kw = _to({k: t for k, t in kw.items() if k in keep}, DEVICE)
    x = logits.to(DEVICE)
    want = P.apply_penalties_ref(x.clone(), **kw)
    launched = []
    for name in ("_bias_kernel", "_penalty_kernel", "_min_p_kernel"):
        kern = getattr(P, name)

        class Spy:
            def __getitem__(self, grid, kern=kern, name=name):
                launched.append(name)
                return kern[grid]
        monkeypatch.setattr(P, name, Spy())
    got = P.apply_penalties_triton(x.clone(), chunk=64, **kw)
    assert torch.equal(got, want)
    assert launched == {"bias": ["_bias_kernel"], "penalties": ["_penalty_kernel"],
                        "min_p": ["_penalty_kernel", "_min_p_kernel"], "none": []}[knobs]
    if knobs == "none":
        assert torch.equal(got, x)


@pytest.mark.parametrize("side", SIDES)
def test_min_p_ties_at_the_threshold_are_kept(side):
    # T = 2, max z = 1.0 -> x_max = 0.5; min_p = 0.25: threshold = 0.5 + ln(0.25) in fp32.
    # A token with x exactly at the threshold stays, the next float below goes; both max ties
    # stay; with min_p = 1 only the max's ties stay; T = 0 (greedy) ignores min_p.
    v = 50
    thresh = (torch.tensor(0.5) + torch.log(torch.tensor(0.25))).item()
    z_at = torch.tensor(thresh) * 2                                   # x = z / 2 == thresh exactly
    assert (z_at / 2).item() == thresh
    z_below = torch.nextafter(z_at, torch.tensor(NEG_INF))
    row = torch.linspace(-9.0, -5.0, v)
    row[7], row[40] = 1.0, 1.0                                       # tied maxima, in different chunks
    row[10], row[11], row[0], row[v - 1] = z_at, z_below, z_at, z_below
    logits = row.repeat(3, 1).to(DEVICE)
    t = torch.tensor([2.0, 2.0, 0.0], device=DEVICE)
    mp = torch.tensor([0.25, 1.0, 0.25], device=DEVICE)
    out = SIDES[side](logits.clone(), temperature=t, min_p=mp, **({"chunk": 16} if side == "triton" else {}))
    kept = [set(torch.isfinite(out[i]).nonzero().flatten().tolist()) for i in range(3)]
    assert kept[0] == {0, 7, 10, 40}
    assert kept[1] == {7, 40}
    assert torch.equal(out[2], logits[2])                            # greedy row untouched
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])   # kept values unchanged


@pytest.mark.parametrize("side", SIDES)
def test_min_p_never_moves_the_argmax(side):
    logits, kw, _ = _case(8, 120, seed=3)
    x = logits.to(DEVICE)
    mp = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.9, 1.0, 0.3, 0.7], device=DEVICE)
    t = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.1, 1.0, 0.0, 3.0], device=DEVICE)
    out = SIDES[side](x.clone(), temperature=t, min_p=mp, **({"chunk": 32} if side == "triton" else {}))
    assert torch.equal(out.argmax(-1), x.argmax(-1))
    assert torch.equal(out[6], x[6])                                 # T = 0: no effect at all


@pytest.mark.parametrize("side", SIDES)
def test_min_p_on_masked_rows_is_relative_to_the_allowed_tokens(side):
    # The engine applies the grammar mask (-inf) first: min_p's maximum must be the largest
    # ALLOWED logit, so a high min_p keeps allowed tokens, never empties the row, and the -inf
    # stay -inf through bias and penalties (no NaN). Allowed tokens sit in other chunks than
    # the masked maximum, so the Triton side's chunk maxima are exercised too.
    v = 100
    torch.manual_seed(5)
    raw = torch.randn(2, v) * 2
    raw[:, 3] = 20.0                                                 # the model's favourite: forbidden
    allowed = torch.zeros(2, v, dtype=torch.bool)
    allowed[:, [40, 41, 77]] = True
    raw[:, 40], raw[:, 41], raw[:, 77] = 1.0, 1.0 + math.log(0.95), -1.0   # p ratios 1, 0.95, e^-2
    masked = raw.masked_fill(~allowed, NEG_INF).to(DEVICE)
    state = P.new_token_state(2, v, DEVICE)
    state[0, 41] = 1                                                 # an output count on an allowed token
    kw = dict(temperature=torch.tensor([1.0, 1.0], device=DEVICE), min_p=torch.tensor([0.9, 0.9], device=DEVICE),
              token_state=state, frequency=torch.tensor([0.0, 0.0], device=DEVICE),
              repetition=torch.tensor([1.3, 1.0], device=DEVICE),
              bias_ids=torch.tensor([[3, 77], [5, -1]], dtype=torch.int32, device=DEVICE),
              bias_values=torch.tensor([[5.0, 0.5], [1.0, 0.0]], device=DEVICE))
    out = SIDES[side](masked.clone(), **kw, **({"chunk": 32} if side == "triton" else {}))
    assert not torch.isnan(out).any()
    assert torch.isinf(out[:, [i for i in range(v) if i not in (40, 41, 77)]]).all()   # the mask held
    kept = [set(torch.isfinite(out[i]).nonzero().flatten().tolist()) for i in range(2)]
    assert kept[1] == {40, 41}                                       # within 90% of the best allowed one
    assert kept[0] == {40}                                           # 41 repeated: 1.3x less likely now
    assert torch.equal(out, P.apply_penalties_ref(masked.clone(), **kw))


@pytest.mark.parametrize("side", SIDES)
def test_logit_bias_extremes_padding_and_order(side):
    v = 70
    logits = torch.zeros(3, v)
    logits[:, 20] = -1.0
    logits[:, 0] = -0.0
    ids = torch.tensor([[0, v - 1, 20, -1, -1],                     # ends of the vocabulary, padding
                        [v - 1, 3, 3, v, -7],                        # a repeated id adds twice; out of range ignored
                        [-1, -1, -1, -1, -1]])                       # all padding: untouched
    vals = torch.tensor([[100.0, -100.0, 3.0, 9.0, 9.0],
                         [0.5, 0.25, 0.5, 9.0, 9.0],
                         [9.0, 9.0, 9.0, 9.0, 9.0]])
    state = P.new_token_state(3, v, "cpu")
    P.init_token_row(state, 0, torch.tensor([20]))                  # token 20 was in the prompt
    kw = _to(dict(bias_ids=ids, bias_values=vals, token_state=state, repetition=torch.tensor([2.0, 1.0, 1.0])),
             DEVICE)
    out = SIDES[side](logits.to(DEVICE), **kw, **({"chunk": 32} if side == "triton" else {})).cpu()
    assert out[0, 0] == 100.0 and out[0, v - 1] == -100.0
    assert out[0, 20] == 1.0                 # bias first (-1 + 3 = 2 > 0), then repetition divides: 2 / 2
    assert out[1, v - 1] == 0.5 and out[1, 3] == 0.75
    assert torch.signbit(out[1:, 0]).all() and torch.signbit(out[0, 1:20]).logical_not().all()
    assert torch.equal(out[2], logits[2]) and torch.equal(torch.signbit(out[2]), torch.signbit(logits[2]))


def _naive_row(z, prompt, output, bias, knobs):
    """OpenAI logit_bias + HF repetition + OpenAI frequency/presence + min_p, token by token, float64."""
    t, min_p, rep, freq, pres = knobs
    z = [float(x) for x in z]
    for tok, val in bias.items():
        z[tok] += val
    counts, seen = Counter(output), set(prompt) | set(output)
    for tok in range(len(z)):
        if tok in seen:
            z[tok] = z[tok] / rep if z[tok] > 0 else z[tok] * rep
        z[tok] -= counts[tok] * freq + float(counts[tok] > 0) * pres
    if min_p > 0 and t > 0:
        x = [zz / t for zz in z]
        x_max = max(x)
        ratio = [math.exp(xx - x_max) for xx in x]                   # p_i / p_max
        assert all(abs(r - min_p) > 1e-4 for r in ratio), "a probability sits on the min_p boundary"
        z = [zz if r >= min_p else NEG_INF for zz, r in zip(z, ratio)]
    return torch.tensor(z, dtype=torch.float64)


def test_reference_matches_naive_openai_hf_formulas():
    logits, kw, per_row = _case(8, 90, seed=21)
    got = P.apply_penalties_ref(logits.clone(), **kw).double()
    for i, (prompt, output, bias, knobs) in enumerate(per_row):
        want = _naive_row(logits[i], prompt, output, bias, knobs)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[i][fin], want[fin], rtol=1e-6, atol=1e-5)


def test_min_p_composes_with_top_k_and_top_p_in_vllm_order():
    # The sampler's sets on the processed logits are vLLM's: min_p, then top-k among its
    # survivors, then top-p renormalised over that set. Spread logits: no boundary within 1e-4.
    v, b = 40, 4
    g = torch.Generator().manual_seed(2)
    logits = torch.stack([torch.linspace(3.0, -3.0, v)[torch.randperm(v, generator=g)] for _ in range(b)])
    t = torch.tensor([1.0, 0.7, 1.3, 1.0])
    mp = torch.tensor([0.2, 0.05, 0.5, 0.1])
    k = torch.tensor([10, 5, 0, 25], dtype=torch.int32)
    p = torch.tensor([0.8, 1.0, 0.6, 0.9])
    out = P.apply_penalties_ref(logits.clone(), temperature=t, min_p=mp)
    allowed = sampling.allowed_mask_ref(out, t, k, p) & torch.isfinite(out)
    for i in range(b):
        x = logits[i].double() / t[i]
        keep = torch.exp(x - x.max()) >= mp[i]                        # min_p on probabilities
        xm = x.masked_fill(~keep, NEG_INF)
        if k[i] > 0:
            keep &= xm >= xm.sort(descending=True).values[int(k[i]) - 1]
        probs = torch.softmax(x.masked_fill(~keep, NEG_INF), 0)
        sp = probs.sort(descending=True).values
        if p[i] < 1:
            assert (sp.cumsum(0) - p[i]).abs().min() > 1e-4
            keep &= probs >= sp[int((sp.cumsum(0) - sp < p[i]).sum()) - 1]
        assert torch.equal(allowed[i], keep), i
    # the Triton sampler on the processed logits never draws a dropped token
    reps = 3
    tok = sampling.sample_triton(out.repeat_interleave(reps, 0).to(DEVICE), t.repeat_interleave(reps).to(DEVICE),
                                 k.repeat_interleave(reps).to(DEVICE), p.repeat_interleave(reps).to(DEVICE),
                                 torch.arange(b * reps, device=DEVICE), chunk=16).cpu()
    assert allowed.repeat_interleave(reps, 0).gather(1, tok[:, None]).all()


def test_token_state_counts_prompt_flag_and_skipped_rows():
    v = 30
    state = P.new_token_state(4, v, "cpu")
    P.init_token_row(state, 1, torch.tensor([0, 29, 4, 4]))
    P.init_token_row(state, 3, torch.tensor([7]))
    steps = [([1, 3, -1], [4, 0, 9]), ([1, 3, -1], [4, 29, 9]), ([1, -1, 3], [12, 5, 29])]
    for rows, toks in steps:
        P.add_output_tokens(state, torch.tensor(rows), torch.tensor(toks))
    assert torch.equal(state[0], torch.zeros(v, dtype=torch.int32))   # -1 rows never touch row 0
    want1 = torch.zeros(v, dtype=torch.int32)
    want1[[0, 29, 4]] = P.PROMPT_SEEN
    want1[4] += 2
    want1[12] += 1
    assert torch.equal(state[1], want1)
    assert (state[3] & P.COUNT_MASK)[[0, 29, 7]].tolist() == [1, 2, 0]
    assert ((state[3] & P.PROMPT_SEEN) != 0).nonzero().flatten().tolist() == [7]
    # rebuilding a row (after a recompute) gives what the steps built
    again = P.new_token_state(4, v, "cpu")
    P.init_token_row(again, 1, torch.tensor([0, 29, 4, 4]), torch.tensor([4, 4, 12]))
    assert torch.equal(again[1], state[1])
    P.init_token_row(state, 1, torch.tensor([5]))                    # a new sequence on the row: reset
    assert ((state[1] != 0).nonzero().flatten().tolist()) == [5]


def test_logprobs_ref_against_naive_log_softmax():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 25, generator=g) * 4
    tokens = torch.tensor([0, 24, 7])
    chosen, top_ids, top_lp = P.logprobs_ref(logits, tokens, 5)
    assert top_ids.shape == (3, 5) and top_lp.dtype == torch.float32
    for i in range(3):
        row = logits[i].double().tolist()
        m = max(row)
        lse = m + math.log(sum(math.exp(z - m) for z in row))
        naive = [z - lse for z in row]
        assert chosen[i].item() == pytest.approx(naive[int(tokens[i])], abs=1e-5)
        order = sorted(range(25), key=lambda j: -naive[j])[:5]
        assert top_ids[i].tolist() == order
        assert top_lp[i].tolist() == pytest.approx([naive[j] for j in order], abs=1e-5)
    _, ids0, lp0 = P.logprobs_ref(logits, tokens, 0)
    assert ids0.shape == (3, 0) and lp0.shape == (3, 0)
    with pytest.raises(ValueError, match="top_n"):
        P.logprobs_ref(logits, tokens, 26)
    # the engine's check on scored prompt rows: a NaN or +inf anywhere in a row shows in its
    # chosen logprob (through the row's logsumexp), a -inf elsewhere does not
    bad = logits.clone()
    bad[0, 3], bad[1, 9], bad[2, 11] = float("nan"), float("inf"), NEG_INF
    c, _, _ = P.logprobs_ref(bad, tokens, 2)
    assert c.isnan()[0] and not c[1].isfinite() and c[2].isfinite()


@pytest.mark.parametrize("side", SIDES)
def test_shape_errors_say_what_is_valid(side):
    fn = SIDES[side]
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="fp32"):
        fn(x.half())
    with pytest.raises(ValueError, match="need token_state"):
        fn(x, repetition=torch.ones(2))
    with pytest.raises(ValueError, match="go together"):
        fn(x, min_p=torch.zeros(2))
    with pytest.raises(ValueError, match=r"token_state must be int32 \[N, 10\]"):
        fn(x, token_state=torch.zeros(2, 11, dtype=torch.int32), frequency=torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[2, K\]"):
        fn(x, bias_ids=torch.zeros(2, 3, dtype=torch.int64), bias_values=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"presence must be \[2\]"):
        fn(x, token_state=torch.zeros(2, 10, dtype=torch.int32), presence=torch.zeros(3))
    assert fn(torch.zeros(0, 10)).shape == (0, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_llama3_vocab_bit_identical_and_no_host_sync():
    # Llama-3 vocabulary, 64 rows of the mixed knobs; both sides and the state update run with
    # torch's sync debug mode set to "error", so any host sync fails the test.
    b, v = 64, 128256
    logits, kw, _ = _case(b, v, seed=5, no_state_row=9)
    x, kw = logits.cuda(), _to(kw, "cuda")
    want = P.apply_penalties_ref(x.clone(), **kw)
    got = P.apply_penalties_triton(x.clone(), **kw)                  # compiles outside the check
    assert torch.equal(got, want)
    tok = torch.randint(0, v, (b,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        P.apply_penalties_triton(x.clone(), **kw)
        P.apply_penalties_ref(x.clone(), **kw)
        P.add_output_tokens(kw["token_state"], kw["state_rows"], tok)
        P.logprobs_ref(x, tok, 20)
    finally:
        torch.cuda.set_sync_debug_mode("default")
