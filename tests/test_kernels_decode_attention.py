"""paged_decode_attention: Triton (interpreter on CPU) against the reference.

Tolerances: fp32 uses IEEE dots and fp32 softmax on both sides, only the summation
order differs (1e-5). fp16 rounds the softmax weights to fp16 before the P@V dot (as
flash attention does) while the reference keeps them in fp32: ~1e-3 relative, so 3e-3.
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
from slotserve.kernels import decode_attention as attn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _case(b, hq, hk, d, bs, lens, dtype, seed=0, extra_blocks=2):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, -(-max(lens) // bs)) + extra_blocks           # wider table than needed
    nb = b * max_blocks + 3
    q = torch.randn(b, hq, d, generator=g).to(DEVICE, dtype)
    kc = torch.randn(nb, bs, hk, d, generator=g).to(DEVICE, dtype)
    vc = torch.randn(nb, bs, hk, d, generator=g).to(DEVICE, dtype)
    tables = torch.randperm(nb, generator=g)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    for i, n in enumerate(lens):                                      # unused entries: -1 (padding)
        tables[i, -(-n // bs):] = -1
    return q, kc, vc, tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


CASES = [  # b, hq, hk, d, bs, seq lens, splits (None = heuristic)
    (1, 4, 4, 64, 16, [1], None),                     # one token, MHA
    (3, 8, 2, 80, 4, [9, 16, 1], None),               # odd head dim, ragged, len = 4 * BS
    (3, 8, 2, 80, 4, [9, 16, 1], 3),                  # same through the reduce stage
    (2, 16, 4, 128, 16, [129, 64], 4),                # GQA 4, len = BS * k and BS * k + 1
    (2, 8, 8, 64, 16, [200, 47], 7),                  # splits not dividing the chunks, empty splits
    (4, 4, 1, 96, 8, [31, 32, 33, 0], 2),             # GQA 4 of one KV head, block edges, empty sequence
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hk,d,bs,lens,splits", CASES)
def test_decode_attention_matches_ref(b, hq, hk, d, bs, lens, splits, dtype):
    q, kc, vc, tables, seq_lens = _case(b, hq, hk, d, bs, lens, dtype)
    scale = d ** -0.5
    got = attn.paged_decode_attention_triton(q, kc, vc, tables, seq_lens, scale, num_splits=splits)
    want = attn.paged_decode_attention_ref(q, kc, vc, tables, seq_lens, scale)
    assert got.shape == (b, hq, d) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    if 0 in lens:
        assert torch.all(got[lens.index(0)] == 0)


def test_decode_attention_strided_query_and_validation():
    q, kc, vc, tables, seq_lens = _case(2, 8, 2, 64, 16, [40, 17], torch.float32)
    qkv = torch.randn(2, 12, 64, device=DEVICE)
    qkv[:, :8] = q
    got = attn.paged_decode_attention_triton(qkv[:, :8], kc, vc, tables, seq_lens, 0.125)
    torch.testing.assert_close(got, attn.paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 0.125),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        attn.paged_decode_attention_triton(q[:, :6], kc[:, :, :1].repeat(1, 1, 4, 1).contiguous(),
                                           vc[:, :, :1].repeat(1, 1, 4, 1).contiguous(), tables, seq_lens, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_long_sequences_gpu(dtype):
    q, kc, vc, tables, seq_lens = _case(8, 32, 8, 128, 16, [4096, 1, 8191, 300, 2048, 17, 5000, 64], dtype)
    got = attn.paged_decode_attention_triton(q, kc, vc, tables, seq_lens, 128 ** -0.5)
    want = attn.paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 128 ** -0.5)
    tol = 3e-3 if dtype == torch.float16 else 2e-2                    # bf16: 8 mantissa bits
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
