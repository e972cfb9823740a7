"""rms_norm: Triton (interpreter on CPU) against the reference.

Tolerances: fp32 1e-5 (the row sum is reduced in a different order, rsqrt vs 1/sqrt);
fp16 2e-3 relative, i.e. ~2 fp16 ulps: a last-bit difference in fp32 rstd can flip the
rounding of the normalised value before the weight multiply. The fused residual output
is one fp32 add rounded once on both sides, so it must match exactly.
"""

import importlib

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
mod = importlib.import_module("slotserve.kernels.rms_norm")   # (the package attr is the op)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,h", [(1, 64), (7, 100), (3, 2048), (2, 4100)])
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm_matches_ref(t, h, dtype, with_res):
    g = torch.Generator().manual_seed(t * h)
    x = (torch.randn(t, h, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.rand(h, generator=g) + 0.5).to(DEVICE, dtype)
    res = torch.randn(t, h, generator=g).to(DEVICE, dtype) if with_res else None
    got = mod.rms_norm_triton(x, w, 1e-6, res)
    want = mod.rms_norm_ref(x, w, 1e-6, res)
    if with_res:
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    assert got.dtype == dtype and got.shape == (t, h)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_rms_norm_strided_rows_and_bad_shapes():
    base = torch.randn(4, 96, device=DEVICE)
    x = base[:, :80]                                   # row stride 96
    w = torch.rand(80, device=DEVICE)
    torch.testing.assert_close(mod.rms_norm_triton(x, w, 1e-5), mod.rms_norm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        mod.rms_norm_triton(x, torch.ones(81, device=DEVICE), 1e-5)


def test_dispatcher_forces_triton(monkeypatch):
    from slotserve import kernels as K

    x, w = torch.randn(3, 48, device=DEVICE), torch.rand(48, device=DEVICE)
    monkeypatch.setenv("SLOTSERVE_KERNELS", "triton")
    calls = []
    real = mod.rms_norm_triton
    monkeypatch.setattr(mod, "rms_norm_triton", lambda *a: calls.append(1) or real(*a))
    K.rms_norm(x, w, 1e-6)
    assert calls == [1]
    monkeypatch.setenv("SLOTSERVE_KERNELS", "torch")
    K.rms_norm(x, w, 1e-6)
    assert calls == [1]
