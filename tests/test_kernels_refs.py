"""The pure-torch references against naive, loop-by-loop math (and HF where it exists)."""

import math

import torch

from slotserve import kernels as K


def test_rms_norm_ref_matches_hf_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x, res = torch.randn(5, 96), torch.randn(5, 96)
    hf = LlamaRMSNorm(96, eps=1e-5)
    hf.weight.data = torch.randn(96)
    assert torch.equal(K.rms_norm_ref(x, hf.weight.data, 1e-5), hf(x))
    y, r = K.rms_norm_ref(x, hf.weight.data, 1e-5, res)
    assert torch.equal(r, x + res) and torch.equal(y, hf(x + res))


def test_rope_ref_matches_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    t, d = 7, 64
    q, k = torch.randn(t, 4, d), torch.randn(t, 2, d)
    pos = torch.tensor([0, 1, 5, 9, 100, 3, 2])
    cache = K.build_cos_sin_cache(128, d, base=10000.0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    # HF layout: [batch, heads, seq, D]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None])
    q2, k2 = K.apply_rope_ref(q, k, pos, cache)
    torch.testing.assert_close(q2, hq[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k2, hk[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    assert not torch.equal(q2, q)  # out of place


def test_silu_and_mul_ref():
    x = torch.randn(3, 2 * 11)
    torch.testing.assert_close(K.silu_and_mul_ref(x), torch.nn.functional.silu(x[:, :11]) * x[:, 11:])


def test_store_kv_ref_skips_negative_slots():
    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    K.store_kv_ref(k, v, kc, vc, torch.tensor([5, -1, 11]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(vc[2, 3], v[2])
    assert (kc != 0).sum() == 2 * 2 * 8


def test_paged_decode_attention_ref_naive():
    torch.manual_seed(0)
    b, hq, hk, d, bs, nb = 3, 8, 2, 16, 4, 12
    q = torch.randn(b, hq, d)
    kc, vc = torch.randn(nb, bs, hk, d), torch.randn(nb, bs, hk, d)
    tables = torch.tensor([[3, 7, 1, -1], [0, 2, 4, 6], [11, -1, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([9, 16, 1], dtype=torch.int32)
    out = K.paged_decode_attention_ref(q, kc, vc, tables, lens, 0.25)
    for i in range(b):
        for h in range(hq):
            ks = torch.stack([kc[tables[i, t // bs], t % bs, h // 4] for t in range(lens[i])])
            vs = torch.stack([vc[tables[i, t // bs], t % bs, h // 4] for t in range(lens[i])])
            p = torch.softmax(ks @ q[i, h] * 0.25, 0)
            torch.testing.assert_close(out[i, h], p @ vs, rtol=1e-5, atol=1e-5)


def test_sample_ref_greedy_topk_reproducible():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    z = torch.zeros(4)
    ids = K.sample_ref(logits, z, torch.zeros(4, dtype=torch.int32), torch.ones(4), torch.arange(4))
    assert torch.equal(ids, logits.argmax(-1))
    t, k, p = torch.ones(4), torch.full((4,), 3, dtype=torch.int32), torch.ones(4)
    top3 = logits.topk(3).indices
    for seed in range(50):
        s = torch.full((4,), seed)
        a = K.sample_ref(logits, t, k, p, s)
        assert (top3 == a[:, None]).any(-1).all()
        assert torch.equal(a, K.sample_ref(logits, t, k, p, s))


def test_dispatcher_uses_ref_on_cpu(monkeypatch):
    monkeypatch.setenv("SLOTSERVE_KERNELS", "auto")
    x, w = torch.randn(2, 8), torch.ones(8)
    assert torch.equal(K.rms_norm(x, w, 1e-6), K.rms_norm_ref(x, w, 1e-6))
    monkeypatch.setenv("SLOTSERVE_KERNELS", "bogus")
    try:
        K.rms_norm(x, w, 1e-6)
    except ValueError as e:
        assert "auto" in str(e)
    else:
        raise AssertionError("bad SLOTSERVE_KERNELS accepted")
