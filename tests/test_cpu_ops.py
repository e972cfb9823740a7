"""The lean model's CPU fast paths agree with the plain torch ops they replace."""

import pytest
import torch
import torch.nn.functional as F

from slotserve.models.cpu_ops import SKINNY_ROWS, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 17, 64, 65, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(80, 96, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    out = linear(x, w, b)
    # Same products summed in another order: fp32 agrees to a few ulps of the row sums
    # (|sum| ~ sqrt(96) here), far inside this tolerance.
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert out.shape == (rows, 80) and out.is_contiguous()


def test_linear_uses_the_transposed_product_only_where_measured():
    w = torch.randn(8, 4)
    lo, hi = SKINNY_ROWS
    for x in (torch.randn(2, 4), torch.randn(hi, 4)):
        assert torch.equal(linear(x, w), torch.mm(w, x.t()).t())
    x = torch.randn(lo, 4)   # one row: the first column of the two-column product
    assert torch.equal(linear(x, w), torch.mm(w, torch.cat([x, x]).t()).t()[:1])
    for x in (torch.randn(hi + 1, 4), torch.randn(lo, 4, dtype=torch.float64),
              torch.randn(3, lo, 4)):
        assert torch.equal(linear(x, w.to(x.dtype)), F.linear(x, w.to(x.dtype)))


# The fused forms must give the references' exact bits in fp32: the engine's greedy output
# is compared token for token with transformers, and the references are what the Triton
# kernels are tested against.
@pytest.mark.parametrize("rows,width", [(1, 512), (8, 512), (64, 96), (33, 64)])
def test_fused_rms_norm_is_bit_identical_to_the_reference(rows, width):
    from slotserve.kernels import rms_norm_ref
    from slotserve.models.cpu_ops import rms_norm

    g = torch.Generator().manual_seed(rows)
    x, r, w = torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g), torch.randn(width, generator=g)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    y, res = rms_norm(x, w, 1e-5, r)
    y_ref, res_ref = rms_norm_ref(x, w, 1e-5, r)
    assert torch.equal(y, y_ref) and torch.equal(res, res_ref)


def test_rope_table_gathered_once_is_bit_identical_to_the_reference():
    from slotserve.kernels import apply_rope_ref, build_cos_sin_cache
    from slotserve.models.cpu_ops import rope

    cache = build_cos_sin_cache(512, 64, dtype=torch.float32, device="cpu")
    pos = torch.tensor([0, 5, 300, 301, 7])
    rot = rope(cache, pos)
    for hq, hk in [(8, 8), (8, 2)]:   # the same table serves every layer (and GQA's k)
        q, k = torch.randn(5, hq, 64), torch.randn(5, hk, 64)
        got, want = rot(q, k), apply_rope_ref(q, k, pos, cache)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("head_major", [False, True])
def test_store_kv_writes_what_the_reference_writes(head_major):
    from slotserve.kernels import store_kv_ref
    from slotserve.models.cpu_ops import store_kv

    def pools():
        shape = (2, 4, 16, 8) if head_major else (4, 16, 2, 8)   # [Hk, NB, BS, D] storage or [NB, BS, Hk, D]
        k, v = torch.zeros(shape), torch.zeros(shape)
        return (k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) if head_major else (k, v)

    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([3, 17, 18, 40, 63])
    (kc, vc), (kr, vr) = pools(), pools()
    store_kv(k, v, kc, vc, slots)
    store_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    with pytest.raises(IndexError):   # a padding slot is an error here, never a silent write
        store_kv(k[:1], v[:1], kc, vc, torch.tensor([-1]))


def test_fused_forms_apply_to_fp32_cpu_on_the_torch_side_only(monkeypatch):
    from slotserve.models.cpu_ops import applies

    assert applies(torch.zeros(2, 4))
    assert not applies(torch.zeros(2, 4, dtype=torch.bfloat16))
    monkeypatch.setenv("SLOTSERVE_KERNELS", "triton")
    assert not applies(torch.zeros(2, 4))
