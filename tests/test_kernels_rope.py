"""apply_rope: Triton (interpreter on CPU) against the reference.

Both sides compute x1*cos - x2*sin in fp32 and round once; Triton may contract to an
FMA, so fp32 allows 1e-5 and fp16 one ulp (1e-3 relative).
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
from slotserve.kernels import rope  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,hq,hk,d", [(1, 1, 1, 64), (5, 8, 2, 80), (3, 32, 8, 128), (4, 12, 12, 96)])
def test_rope_matches_ref(t, hq, hk, d, dtype):
    g = torch.Generator().manual_seed(t + hq + d)
    # q, k as strided views of one fused qkv projection, as the model produces them
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    cache = rope.build_cos_sin_cache(4096, d, base=500000.0, device=DEVICE)
    pos = torch.randint(0, 4096, (t,), generator=g).to(DEVICE)
    pos[0] = 4095
    before = qkv.clone()
    gq, gk = rope.apply_rope_triton(q, k, pos, cache)
    wq, wk = rope.apply_rope_ref(q, k, pos, cache)
    assert torch.equal(qkv, before)                        # out of place
    torch.testing.assert_close(gq, wq, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(gk, wk, rtol=TOL[dtype], atol=TOL[dtype])


def test_rope_position_zero_is_identity_and_custom_inv_freq():
    q, k = torch.randn(2, 4, 64, device=DEVICE), torch.randn(2, 2, 64, device=DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64)) / 8.0    # e.g. a scaled rope
    cache = rope.build_cos_sin_cache(16, 64, inv_freq=inv, device=DEVICE)
    gq, gk = rope.apply_rope_triton(q, k, torch.zeros(2, dtype=torch.int64, device=DEVICE), cache)
    assert torch.equal(gq, q) and torch.equal(gk, k)
    assert not torch.allclose(cache, rope.build_cos_sin_cache(16, 64, base=10000.0, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,hq,hk,d", [(13, 12, 4, 80), (37, 4, 2, 64)])
def test_rope_multi_token_tiles(t, hq, hk, d, dtype, monkeypatch):
    # One SM: the launcher packs several tokens per program; T is not a multiple of the tile.
    from slotserve.kernels import dispatch

    monkeypatch.setattr(dispatch, "sm_count", lambda device: 1)
    assert rope.rope_launch_meta(t, hq, hk, d, 1)["BLOCK_T"] > 1
    g = torch.Generator().manual_seed(t * d)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    cache = rope.build_cos_sin_cache(512, d, device=DEVICE)
    pos = torch.randint(0, 512, (t,), generator=g).to(DEVICE)
    gq, gk = rope.apply_rope_triton(q, k, pos, cache)
    wq, wk = rope.apply_rope_ref(q, k, pos, cache)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(gq, wq, rtol=tol, atol=tol)
    torch.testing.assert_close(gk, wk, rtol=tol, atol=tol)
