"""sample: greedy, exact top-k/top-p sets, distribution, reproducibility; Triton and reference.

The two sides use different counter-based generators (Philox in Triton, a 32-bit integer
hash in the reference), so for one seed they draw different tokens; each is checked on
its own against the same properties. All seeds are fixed, so no test is flaky: a
statistical bound is either met by these draws or not, every run.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports Triton, which reads it at import
from slotserve.kernels.testing import interpreter_ready  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_ready(), reason="Triton imported before "
                                "TRITON_INTERPRET=1; run in a fresh process by test_kernels_interpreter.py")
from slotserve.kernels import sampling  # noqa: E402

SIDES = {"triton": sampling.sample_triton, "ref": sampling.sample_ref}
# chi-square critical values at p = 0.001 (a correct sampler fails ~1 in 1000 seed sets)
CHI2_999 = {2: 13.82, 3: 16.27, 7: 24.32}


def _params(b, temperature=1.0, top_k=0, top_p=1.0, seed0=0, offset=0):
    return (torch.full((b,), temperature, device=DEVICE), torch.full((b,), top_k, dtype=torch.int32, device=DEVICE),
            torch.full((b,), top_p, device=DEVICE), torch.arange(seed0, seed0 + b, device=DEVICE),
            torch.full((b,), offset, device=DEVICE))


def _chi2(tokens, probs):
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.double().cpu() * tokens.numel()
    return (((counts - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_is_argmax_with_lowest_index_on_ties(side, dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 1000, generator=g).to(DEVICE, dtype)
    logits[2, 10] = logits[2, 700] = 9.0                               # tie: the lower id wins
    t, k, p, s, o = _params(5, temperature=0.0, top_k=5, top_p=0.5)
    kw = {"chunk": 256} if side == "triton" else {}                     # several chunks per row
    got = SIDES[side](logits, t, k, p, s, o, **kw)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(-1)) and got[2] == 10


def _logits_with_clear_boundaries(v, seed):
    # Spread logits so no top-p boundary sits within 1e-4 of a cumulative sum (exact sets).
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(3.0, -3.0, v)[torch.randperm(v, generator=g)]


CONFIGS = [(1.0, 3, 1.0), (0.7, 1, 1.0), (1.0, 0, 0.3), (1.3, 6, 0.5), (0.5, 0, 0.9), (0.9, 7, 0.95)]


def _config_batch(repeat):
    v = 40
    rows, params = [], []
    for i, (temperature, top_k, top_p) in enumerate(CONFIGS):
        rows.append(_logits_with_clear_boundaries(v, seed=i))
        params.append((temperature, top_k, top_p))
    logits = torch.stack(rows).repeat_interleave(repeat, 0).to(DEVICE)
    t, k, p = (torch.tensor([c[n] for c in params for _ in range(repeat)], device=DEVICE) for n in range(3))
    return logits, t.float(), k.int(), p.float()


def test_allowed_sets_are_exact():
    # The reference's set against its float64 definition (no boundary within 1e-4 of top_p),
    # then the Triton thresholds (several chunks per row) against the reference's set.
    logits, t, k, p = _config_batch(1)
    allowed = sampling.allowed_mask_ref(logits, t, k, p).cpu()
    for i, (temperature, top_k, top_p) in enumerate(CONFIGS):
        x = logits[i].double().cpu() / temperature
        keep = x >= x.sort(descending=True).values[(top_k or x.numel()) - 1]
        probs = torch.softmax(x.masked_fill(~keep, float("-inf")), 0)
        sp = probs.sort(descending=True).values
        if top_p < 1:
            assert (sp.cumsum(0) - top_p).abs().min() > 1e-4
            keep &= probs >= sp[int((sp.cumsum(0) - sp < top_p).sum()) - 1]
        assert torch.equal(allowed[i], keep), CONFIGS[i]
    seeds = torch.arange(len(CONFIGS), device=DEVICE)
    _, thresh = sampling.sample_triton(logits, t, k, p, seeds, chunk=16, return_threshold=True)
    assert torch.equal((_key(logits.float() / t[:, None]) >= thresh[:, None]).cpu(), allowed)   # the very same sets


@pytest.mark.parametrize("side,draws", [("triton", 12), ("ref", 200)])
def test_draws_never_leave_the_allowed_set(side, draws):
    logits, t, k, p = _config_batch(draws)
    allowed = sampling.allowed_mask_ref(logits, t, k, p)
    seeds = torch.arange(logits.shape[0], device=DEVICE) * 7919
    got = SIDES[side](logits, t, k, p, seeds, torch.full_like(seeds, 5))
    assert allowed.gather(1, got[:, None]).all(), "sampled a token outside the top-k/top-p set"
    for i in range(len(CONFIGS)):                                      # small sets are fully reachable
        ids = set(got[i * draws:(i + 1) * draws].tolist())
        want = set(allowed[i * draws].nonzero().flatten().tolist())
        if len(want) <= (4 if side == "ref" else 3):
            assert ids == want


@pytest.mark.parametrize("side,draws", [("triton", 1000), ("ref", 20000)])
def test_distribution_matches_softmax(side, draws):
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0, 0.3, -0.5, 1.5])
    t, k, p, s, o = _params(draws, temperature=0.8, seed0=12345, offset=3)
    got = SIDES[side](logits.repeat(draws, 1).to(DEVICE), t, k, p, s, o)
    assert _chi2(got, torch.softmax(logits / 0.8, 0)) < CHI2_999[7]


@pytest.mark.parametrize("side,draws", [("triton", 150), ("ref", 20000)])
def test_distribution_renormalised_over_topk(side, draws):
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0, 0.3, -0.5, 1.5])
    t, k, p, s, o = _params(draws, temperature=1.0, top_k=3, seed0=777)
    got = SIDES[side](logits.repeat(draws, 1).to(DEVICE), t, k, p, s, o)
    top = torch.tensor([4, 7, 0])
    assert torch.isin(got.cpu(), top).all()
    probs = torch.softmax(logits[top], 0)
    remap = torch.zeros(8, dtype=torch.int64)
    remap[top] = torch.arange(3)
    assert _chi2(remap[got.cpu()], probs) < CHI2_999[2]


@pytest.mark.parametrize("side", SIDES)
def test_same_seed_same_tokens_other_offsets_other_draws(side):
    b, v = 32, 500
    logits = torch.zeros(b, v, device=DEVICE)                            # flat: draws rarely collide
    t, k, p, s, o = _params(b, seed0=99)
    first = SIDES[side](logits, t, k, p, s, o)
    assert torch.equal(first, SIDES[side](logits, t, k, p, s, o))
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0)).to(DEVICE)   # batch position is irrelevant
    assert torch.equal(SIDES[side](logits, t, k, p, s[perm], o[perm]), first[perm])
    later = SIDES[side](logits, t, k, p, s, o + 1)
    assert (later != first).float().mean() > 0.9
    other = SIDES[side](logits, t, k, p, s + 1000, o)
    assert (other != first).float().mean() > 0.9


def test_dispatcher_routes_sample(monkeypatch):
    from slotserve import kernels as K

    logits = torch.randn(4, 64, device=DEVICE)
    args = _params(4)
    monkeypatch.setenv("SLOTSERVE_KERNELS", "triton")
    assert torch.equal(K.sample(logits, *args), sampling.sample_triton(logits, *args))
    monkeypatch.setenv("SLOTSERVE_KERNELS", "torch")
    assert torch.equal(K.sample(logits, *args), sampling.sample_ref(logits, *args))
    zero = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    assert torch.equal(K.sample(logits, *args[:4]), sampling.sample_ref(logits, *args[:4], zero))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_gpu():
    logits = torch.randn(8, 128256, device="cuda")
    args = _params(8, temperature=0.7, top_k=50, top_p=0.9)
    sampling.sample_triton(logits, *args)                               # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampling.sample_triton(logits, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _key(x):
    # the order-preserving int32 key of fp32 x that the Triton thresholds live on (-0.0 keyed as +0.0)
    bits = x.float().view(torch.int32)
    bits = torch.where(bits == -2**31, 0, bits)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def test_mixed_batch_over_chunks_exact_sets_and_chunking_independent_draws():
    # Greedy, plain, top-k only, top-p only and both in one batch, each row over 5 chunks,
    # with ties straddling chunks (rounded logits, repeated values) at the top-k boundary.
    g = torch.Generator().manual_seed(5)
    v = 300
    logits = torch.randn(8, v, generator=g) * 2
    logits[2] = torch.round(logits[2])                             # heavy ties
    logits[5, ::7] = float("-inf")
    logits = logits.to(DEVICE)
    t = torch.tensor([0.0, 0.8, 1.0, 0.6, 1.2, 1.0, 0.7, 1.5], device=DEVICE)
    k = torch.tensor([5, 0, 20, 0, 7, 299, 50, 3], dtype=torch.int32, device=DEVICE)
    p = torch.tensor([0.5, 1.0, 1.0, 0.7, 1.0, 0.9, 0.95, 0.4], device=DEVICE)
    seeds = torch.arange(8, device=DEVICE) * 31
    got, thresh = sampling.sample_triton(logits, t, k, p, seeds, chunk=64, return_threshold=True)
    allowed = sampling.allowed_mask_ref(logits, t, k, p)
    x = logits.float() / torch.where(t > 0, t, 1.0)[:, None]
    sampled = (t > 0).cpu()
    assert torch.equal(((_key(x) >= thresh[:, None]).cpu())[sampled], allowed.cpu()[sampled])
    assert got[0] == logits[0].argmax()
    assert allowed.gather(1, got[:, None])[1:].all()
    # Gumbel-max over the allowed set does not depend on how a row is split into chunks
    assert torch.equal(sampling.sample_triton(logits, t, k, p, seeds, chunk=1024), got)


def test_signed_zeros_tie_at_the_threshold():
    # x = -0.0 and +0.0 compare equal, so both belong to a top-k set that ends at 0
    v = 64
    logits = torch.full((1, v), -3.0)
    logits[0, :4] = 2.0
    logits[0, 4:12] = -0.0
    logits[0, 12:20] = 0.0
    n = 48
    logits = logits.repeat(n, 1).to(DEVICE)
    t, k, p, s, o = _params(n, temperature=1.0, top_k=8, seed0=3)
    allowed = sampling.allowed_mask_ref(logits, t, k, p)
    assert int(allowed[0].sum()) == 20
    got, thresh = sampling.sample_triton(logits, t, k, p, s, o, return_threshold=True)
    assert torch.equal((_key(logits) >= thresh[:, None]).cpu(), allowed.cpu())
    assert allowed.gather(1, got[:, None]).all()
    assert ((got >= 4) & (got < 12)).any()                          # some -0.0 token is drawn


def test_unfiltered_hint_two_launches_same_tokens(monkeypatch):
    # filtered=False (no row uses top-k/top-p): the first pass draws every sampled row and
    # the pick follows; the tokens are those of the full launch sequence.
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(6, 700, generator=g) * 2).to(DEVICE)
    t = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.9], device=DEVICE)
    k, p = torch.zeros(6, dtype=torch.int32, device=DEVICE), torch.ones(6, device=DEVICE)
    seeds, offs = torch.arange(6, device=DEVICE) + 40, torch.full((6,), 2, device=DEVICE)
    full = sampling.sample_triton(logits, t, k, p, seeds, offs, chunk=128)
    launched = []
    for name in ("_first_kernel", "_topk_kernel", "_topp_kernel", "_draw_kernel", "_pick_kernel"):
        kern = getattr(sampling, name)

        class Spy:
            def __getitem__(self, grid, kern=kern, name=name):
                launched.append(name)
                return kern[grid]
        monkeypatch.setattr(sampling, name, Spy())
    hinted, thresh = sampling.sample_triton(logits, t, k, p, seeds, offs, chunk=128, return_threshold=True,
                                            filtered=False)
    assert launched == ["_first_kernel", "_pick_kernel"]
    assert torch.equal(hinted, full) and (thresh == -2**31).all()
    # a broken promise: still 2 launches; top-k/top-p are ignored, never garbage
    launched.clear()
    k2 = torch.full((6,), 3, dtype=torch.int32, device=DEVICE)
    assert torch.equal(sampling.sample_triton(logits, t, k2, p * 0.5, seeds, offs, chunk=128, filtered=False), full)
    assert launched == ["_first_kernel", "_pick_kernel"]


def test_dispatcher_passes_the_unfiltered_hint(monkeypatch):
    from slotserve import kernels as K

    logits = torch.randn(4, 64, device=DEVICE)
    args = _params(4, temperature=0.8)
    for side in ("triton", "torch"):
        monkeypatch.setenv("SLOTSERVE_KERNELS", side)
        assert torch.equal(K.sample(logits, *args, filtered=False), K.sample(logits, *args))
