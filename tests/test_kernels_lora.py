"""lora: Triton (interpreter on CPU) against the reference; the reference against per-row math and PEFT.

Tolerances (Triton vs reference): both compute fl(y + scaling * ((x @ A^T) @ B^T)) with fp32
products and sums and one rounding to y's dtype; only the summation order differs (split-K
partials, dot tiling). fp32: 1e-5. fp16/bf16: a last-bit difference of the fp32 value can
land on the other side of the final rounding, so one ulp of the output (2^-10 / 2^-7
relative), plus 1e-5 absolute for the fp32 difference itself near zero. For bf16 the
interpreter (Triton 3.9) converts fp32 -> bf16 by truncation, not round-to-nearest as the
GPU does, so there the bound is used in full (about half the bf16 outputs differ by up to
an ulp); fp16 converts with numpy's rounding, and matches the reference almost everywhere.
Rows without an adapter and columns outside the adapter's slice must be bit-identical.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports Triton, which reads it at import
from slotserve.kernels.testing import interpreter_ready  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU the kernels run in Triton's interpreter; if Triton was imported earlier in this
# process without it, test_kernels_interpreter.py re-runs this file in a fresh process.
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_ready(), reason="Triton imported before "
                                "TRITON_INTERPRET=1; run in a fresh process by test_kernels_interpreter.py")
lora = importlib.import_module("slotserve.kernels.lora")   # (the package attr `lora` is the op)

RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _adapters(pattern: str, t: int, n: int, g: torch.Generator) -> torch.Tensor:
    if pattern == "one":                                    # every row the same adapter
        return torch.full((t,), n - 1)
    if pattern == "none":                                   # plain base model only
        return torch.full((t,), -1)
    if pattern == "mixed":                                  # decode batch: any order, some base rows
        return torch.randint(-1, n, (t,), generator=g)
    assert pattern == "segmented"                           # prefill: contiguous runs, one of base rows
    runs = torch.randint(1, max(2, t // 3), (t,), generator=g).tolist()
    out, a = [], 0
    for length in runs:
        out += [a - 1] * length                             # -1, 0, 1, ..., wrapping
        a = (a + 1) % (n + 1)
    return torch.tensor(out[:t])


def _case(t, h, w, r, n, pattern, dtype, y_cols=None, seed=0, idx_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    y = torch.randn(t, y_cols or w, generator=g).to(DEVICE, dtype)
    a_stack = (torch.randn(n, r, h, generator=g) / h ** 0.5).to(DEVICE, dtype)
    b_stack = (torch.randn(n, w, r, generator=g) / r ** 0.5).to(DEVICE, dtype)
    scaling = (torch.rand(n, generator=g) * 1.5 + 0.5).to(DEVICE)
    idx = _adapters(pattern, t, n, g).to(DEVICE, idx_dtype)
    return y, x, a_stack, b_stack, scaling, idx


def _assert_untouched(got, y, idx, col_offset, w):
    base = (idx < 0).nonzero().flatten()
    assert torch.equal(got[base], y[base])                  # bit for bit, -0.0 included
    assert torch.equal(got[:, :col_offset], y[:, :col_offset])
    assert torch.equal(got[:, col_offset + w:], y[:, col_offset + w:])


CASES = [  # T, H_in, W, R, n_slots, adapters, col_offset, y columns, num_splits (None = heuristic)
    (1, 64, 48, 16, 2, "one", 0, None, None),             # decode, one row
    (1, 64, 48, 16, 2, "none", 0, None, None),            # one base row: untouched
    (17, 100, 70, 8, 3, "mixed", 5, 80, 2),               # odd H/W, T % 32 != 0, a column slice, split-K
    (33, 48, 40, 1, 2, "one", 0, None, 3),                # rank 1, all rows one adapter, 3 partial sums
    (40, 80, 96, 16, 4, "segmented", 16, 120, 4),         # prefill-like runs crossing tile edges
    (130, 40, 36, 8, 3, "segmented", 0, None, None),      # 64-row tiles, last one partial
    (20, 72, 50, 40, 3, "mixed", 0, None, 2),             # rank 40: two rank chunks in expand
    (6, 50, 30, 72, 2, "mixed", 3, 40, None),             # rank 72: two rank blocks in shrink's grid
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,h,w,r,n,pattern,off,cols,splits", CASES)
def test_lora_matches_ref(t, h, w, r, n, pattern, off, cols, splits, dtype):
    idx_dtype = torch.int64 if t % 2 else torch.int32
    y, x, a, b, sc, idx = _case(t, h, w, r, n, pattern, dtype, cols, seed=t * h + r, idx_dtype=idx_dtype)
    got = lora.lora_triton(y.clone(), x, a, b, sc, idx, off, num_splits=splits)
    want = lora.lora_ref(y.clone(), x, a, b, sc, idx, off)
    assert got.shape == y.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=ATOL[dtype])
    _assert_untouched(got, y, idx, off, w)
    if pattern != "none":
        assert not torch.equal(got, y)                      # the adapters did something


def test_shrink_partials_sum_to_x_at_a():
    y, x, a, b, sc, idx = _case(19, 96, 8, 8, 3, "mixed", torch.float32, seed=3)
    want = torch.zeros(19, 8)
    for row, ad in enumerate(idx.tolist()):
        if ad >= 0:
            want[row] = x[row].cpu() @ a[ad].cpu().T
    for splits in (1, 4):
        s = lora.lora_shrink_triton(x, a, idx, num_splits=splits)
        assert s.shape == (splits, 19, 8) and s.dtype == torch.float32
        torch.testing.assert_close(s.sum(0).cpu(), want, rtol=1e-5, atol=1e-5)
        assert torch.all(s[:, idx < 0] == 0)


def test_fused_qkv_slices_share_one_shrink():
    # y = one fused qkv output [T, q | k | v]; the adapters target q_proj and v_proj only.
    t, h, r, n, wq, wk = 9, 64, 8, 3, 32, 16
    y, x, a_q, b_q, sc, idx = _case(t, h, wq, r, n, "mixed", torch.float16, y_cols=wq + 2 * wk, seed=5)
    _, _, a_v, b_v, _, _ = _case(t, h, wk, r, n, "one", torch.float16, seed=6)
    s = lora.lora_shrink_triton(x, torch.cat([a_q, a_v], 1), idx)     # one shrink, rank 2R
    got = lora.lora_expand_triton(y.clone(), s[..., :r], b_q, sc, idx, col_offset=0)
    got = lora.lora_expand_triton(got, s[..., r:], b_v, sc, idx, col_offset=wq + wk)
    want = lora.lora_ref(y.clone(), x, a_q, b_q, sc, idx, 0)
    want = lora.lora_ref(want, x, a_v, b_v, sc, idx, wq + wk)
    torch.testing.assert_close(got, want, rtol=RTOL[torch.float16], atol=ATOL[torch.float16])
    assert torch.equal(got[:, wq:wq + wk], y[:, wq:wq + wk])          # k: no adapter, untouched
    # the same through the one-call launcher, once per slice
    per_slice = lora.lora_triton(y.clone(), x, a_q, b_q, sc, idx, 0)
    per_slice = lora.lora_triton(per_slice, x, a_v, b_v, sc, idx, wq + wk)
    torch.testing.assert_close(per_slice, want, rtol=RTOL[torch.float16], atol=ATOL[torch.float16])


def test_strided_views_and_out_of_range_indices():
    y, x, a, b, sc, _ = _case(12, 40, 24, 4, 2, "one", torch.float32, seed=7)
    xs = torch.randn(12, 56, device=DEVICE)
    xs[:, 8:48] = x
    ys = torch.randn(12, 30, device=DEVICE)
    ys[:, 2:26] = y
    idx = torch.tensor([0, 1, -1, 2, 7, -5, 1, 0, 0, 1, 2, -1], dtype=torch.int64, device=DEVICE)
    idx2 = torch.stack([idx, -idx], 1)[:, 0]                           # stride 2
    got = lora.lora_triton(ys.clone()[:, 2:26], xs[:, 8:48], a, b, sc, idx2)
    want = lora.lora_ref(y.clone(), x, a, b, sc, idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_untouched(got, y, torch.where((idx >= 0) & (idx < 2), idx, -1), 0, 24)   # 2, 7: outside [0, 2)


def test_unused_slots_may_hold_garbage():
    # An engine's stacks come from torch.empty: slots no row names may hold anything, NaN included.
    y, x, a, b, sc, _ = _case(21, 48, 40, 8, 4, "one", torch.float16, seed=9)
    idx = torch.tensor([0, 2, -1] * 7, dtype=torch.int32, device=DEVICE)
    clean = lora.lora_ref(y.clone(), x, a, b, sc, idx)
    for slot in (1, 3):
        a[slot], b[slot], sc[slot] = float("nan"), float("nan"), float("nan")
    for fn in (lora.lora_triton, lora.lora_ref):
        got = fn(y.clone(), x, a, b, sc, idx)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, clean, rtol=RTOL[torch.float16], atol=ATOL[torch.float16])


def test_empty_batch_is_a_no_op():
    y, x, a, b, sc, idx = _case(0, 16, 16, 4, 2, "none", torch.float32)
    assert lora.lora_triton(y, x, a, b, sc, idx).shape == (0, 16)


def test_launcher_rejects_bad_shapes():
    y, x, a, b, sc, idx = _case(4, 32, 24, 8, 2, "mixed", torch.float16)
    bad = [
        ((y, x, a[:, :, :30], b, sc, idx), "a_stack must be"),
        ((y, x, a.float(), b, sc, idx), "a_stack must be"),
        ((y, x, a, b[:, :, :4], sc, idx), "agree on n_slots"),
        ((y, x, a, b.float(), sc, idx), "b_stack must be"),
        ((y, x, a, b, sc.half(), idx), "scaling must be"),
        ((y, x, a, b, sc[:1], idx), "scaling must be"),
        ((y, x, a, b, sc, idx[:3]), "row_adapter must be"),
        ((y, x, a, b, sc, idx.float()), "row_adapter must be"),
        ((y[:3], x, a, b, sc, idx), "share T"),
        ((y, x, a, b, sc, idx, 1), "do not fit"),
        ((y, x.t().contiguous().t(), a, b, sc, idx), "x must be"),         # column-major
        ((y, x, a.to("meta"), b, sc, idx), "a_stack is on"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            lora.lora_triton(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_gpu_no_sync_and_cuda_graph_replays_new_indices(dtype):
    # Llama-3-8B q slice of a fused qkv [T, 6144], rank 16, 4 slots. The indices are read on
    # the device: a captured graph replayed after the indices change in place follows them.
    # On GPU the final rounding is round-to-nearest on both sides: one ulp as above.
    t, h, w, r, n = 64, 4096, 4096, 16, 4
    y, x, a, b, sc, idx = _case(t, h, w, r, n, "mixed", dtype, y_cols=6144, seed=23)
    lora.lora_triton(y.clone(), x, a, b, sc, idx)                       # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora.lora_triton(y.clone(), x, a, b, sc, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = y.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora.lora_triton(out, x, a, b, sc, idx)
    for new in (torch.randint(-1, n, (t,)), torch.full((t,), -1), torch.arange(t) * n // t):
        idx.copy_(new.to(idx.dtype))
        out.copy_(y)
        graph.replay()
        want = lora.lora_ref(y.clone(), x, a, b, sc, idx)
        torch.testing.assert_close(out, want, rtol=RTOL[dtype], atol=ATOL[dtype])
        _assert_untouched(out, y, idx, 0, w)


# ----------------------------------------------------------------------------- the reference alone

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_is_the_exact_value_rounded_once(dtype):
    # An explicit per-row loop in float64: fp32 within 1e-5; 16-bit outputs are the exact
    # value rounded once, so within half an ulp (unit roundoff 2^-8 for bf16) plus fp32 noise.
    y, x, a, b, sc, idx = _case(23, 72, 40, 16, 4, "mixed", dtype, y_cols=50, seed=11)
    got = lora.lora_ref(y.clone(), x, a, b, sc, idx, col_offset=6).cpu().double()
    want = y.cpu().double()
    for row, ad in enumerate(idx.tolist()):
        if ad >= 0:
            s = x[row].cpu().double() @ a[ad].cpu().double().T
            want[row, 6:46] += float(sc[ad]) * (s @ b[ad].cpu().double().T)
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-8 * 1.01
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)


def _peft(y, x, a, b, sc, idx, off):
    # PEFT's mixed-batch LoRA: per adapter, its rows get lora_B(lora_A(dropout(x))) * scaling
    # (dropout: identity at inference) added to the base output, each step in the model dtype.
    out = y.clone()
    w = b.shape[1]
    for ad in range(a.shape[0]):
        rows = (idx == ad).nonzero().flatten()
        if len(rows):
            delta = F.linear(F.linear(x[rows], a[ad]), b[ad]) * sc[ad].to(x.dtype)
            out[rows, off:off + w] = out[rows, off:off + w] + delta
    return out


def test_ref_matches_peft_composition_fp32():
    y, x, a, b, sc, idx = _case(31, 64, 48, 8, 3, "mixed", torch.float32, y_cols=56, seed=13)
    torch.testing.assert_close(lora.lora_ref(y.clone(), x, a, b, sc, idx, 8), _peft(y, x, a, b, sc, idx, 8),
                               rtol=1e-5, atol=1e-5)


def test_ref_vs_peft_composition_bf16():
    # PEFT rounds x @ A^T, the B product and the scaled delta to bf16 before the add; the
    # reference rounds once. Bound on their difference, u = 2^-8 (bf16 unit roundoff):
    #   u * scaling * (|x @ A^T| @ |B|^T)   (s rounded)   + 2u * |delta| (B product, scaling)
    #   + u * |out| on each side (the final rounding)
    # and the reference must be at least as close to the exact (float64) value as PEFT.
    u = 2.0**-8
    y, x, a, b, sc, idx = _case(37, 96, 40, 16, 3, "mixed", torch.bfloat16, seed=17)
    ours = lora.lora_ref(y.clone(), x, a, b, sc, idx).double()
    peft = _peft(y, x, a, b, sc, idx, 0).double()
    exact, bound = y.double(), torch.zeros(y.shape, dtype=torch.float64, device=y.device)
    for row, ad in enumerate(idx.tolist()):
        if ad >= 0:
            s = x[row].double() @ a[ad].double().T
            delta = float(sc[ad]) * (s @ b[ad].double().T)
            exact[row] += delta
            bound[row] = u * float(sc[ad]) * (s.abs() @ b[ad].double().abs().T) + 2 * u * delta.abs()
    bound += u * (ours.abs() + peft.abs()) + 1e-6
    assert torch.all((ours - peft).abs() <= bound)
    assert (ours - exact).abs().max() <= (peft - exact).abs().max()
    assert (ours - exact).abs().mean() < (peft - exact).abs().mean()
    base = idx < 0
    assert torch.equal(ours[base], y[base].double()) and torch.equal(peft[base], y[base].double())
