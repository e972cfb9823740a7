"""silu_and_mul: Triton (interpreter on CPU) against the reference.

fp32: exp implementations differ by an ulp or so (1e-5). fp16: silu is rounded to fp16
before the multiply on both sides; a last-bit exp difference can flip that rounding,
so two fp16 ulps (2e-3 relative).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports Triton, which reads it at import
from slotserve.kernels.testing import interpreter_ready

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU the kernels run in Triton's interpreter; if Triton was imported earlier in this
# process without it, test_kernels_interpreter.py re-runs this file in a fresh process.
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_ready(), reason="Triton imported before "
                                "TRITON_INTERPRET=1; run in a fresh process by test_kernels_interpreter.py")
from slotserve.kernels import activation  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,inter", [(1, 1), (1, 37), (4, 1000), (3, 2051)])
def test_silu_and_mul_matches_ref(t, inter, dtype):
    g = torch.Generator().manual_seed(t * inter)
    x = (torch.randn(t, 2 * inter, generator=g) * 4).to(DEVICE, dtype)
    got = activation.silu_and_mul_triton(x)
    assert got.shape == (t, inter) and got.dtype == dtype
    torch.testing.assert_close(got, activation.silu_and_mul_ref(x), rtol=TOL[dtype], atol=TOL[dtype])


def test_silu_and_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="2I"):
        activation.silu_and_mul_triton(torch.randn(2, 7, device=DEVICE))
