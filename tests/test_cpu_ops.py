"""The lean model's CPU fast paths agree with the plain torch ops they replace."""

import pytest
import torch
import torch.nn.functional as F

from slotserve.cpu_ops import SKINNY_ROWS, linear


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
