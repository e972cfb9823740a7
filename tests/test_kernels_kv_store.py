"""store_kv: Triton (interpreter on CPU) against the reference; a copy, so exact."""

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
from slotserve.kernels import kv_store  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,hk,d,nb,bs", [(1, 1, 64, 2, 16), (6, 2, 80, 5, 4), (9, 8, 128, 4, 16)])
def test_store_kv_matches_ref(t, hk, d, nb, bs, dtype):
    g = torch.Generator().manual_seed(t * d)
    kv = torch.randn(t, 2, hk, d, generator=g).to(DEVICE, dtype)
    k, v = kv[:, 0], kv[:, 1]                                  # strided views, like a fused qkv
    slots = torch.randperm(nb * bs, generator=g)[:t].to(DEVICE)
    if t > 2:
        slots[1] = -1                                          # padding token: skipped
    caches = [torch.randn(nb, bs, hk, d, generator=g).to(DEVICE, dtype) for _ in range(2)]
    ref = [c.clone() for c in caches]
    kv_store.store_kv_triton(k, v, caches[0], caches[1], slots)
    kv_store.store_kv_ref(k, v, ref[0], ref[1], slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


def test_store_kv_rejects_mismatched_cache():
    k = torch.randn(2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="caches"):
        kv_store.store_kv_triton(k, k, torch.zeros(2, 4, 2, 16, device=DEVICE), torch.zeros(2, 4, 2, 16, device=DEVICE),
                                 torch.zeros(2, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("t,hk,d", [(37, 2, 80), (13, 8, 64)])
def test_store_kv_multi_token_tiles(t, hk, d, slot_dtype, monkeypatch):
    # One SM: the launcher packs several tokens per program; T is not a multiple of the tile;
    # padding tokens (-1) anywhere in a tile; int32 slots are read as they are.
    from slotserve.kernels import dispatch

    monkeypatch.setattr(dispatch, "sm_count", lambda device: 1)
    assert kv_store.store_kv_launch_meta(t, hk, d, 1)["BLOCK_T"] > 1
    g = torch.Generator().manual_seed(t + d)
    kv = torch.randn(t, 2, hk, d, generator=g).to(DEVICE, torch.float16)
    nb, bs = 8, 16
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[::5] = -1
    slots = slots.to(DEVICE, slot_dtype)
    caches = [torch.randn(nb, bs, hk, d, generator=g).to(DEVICE, torch.float16) for _ in range(2)]
    ref = [c.clone() for c in caches]
    kv_store.store_kv_triton(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    kv_store.store_kv_ref(kv[:, 0], kv[:, 1], ref[0], ref[1], slots.long())
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
