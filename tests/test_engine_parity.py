"""The lean engine reproduces transformers token for token (fp32, CPU) for each architecture.

Tiny random models tie easily: with the default init (std 0.02) the logits of a 2-layer
model sit within ~1e-3 of each other, and a reordered fp32 sum (fused q|k|v matmul,
SDPA vs eager softmax) flips greedy picks. We init with std 0.2 and random norm weights
and biases so logits are spread over several units; the margins between the top two
logits are then orders of magnitude above the ~1e-5 fp32 noise, so greedy is stable.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

from slotserve.engine import Engine, SamplingParams

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama3-rope": lambda: LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-bias-mha": lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None, head_dim=16),
    "qwen2-tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32),   # head_dim != hidden/heads on purpose
}

PROMPTS = [[1, 17, 42, 99, 3, 250, 77], [1, 5], list(range(30, 71)), [1, 200, 201, 202, 9, 9, 9, 9, 12, 64, 128]]


def build(name: str, path, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # exercise the loading of every norm weight and bias
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def arch(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = build(request.param, path)
    eng = Engine.from_pretrained(path, kv_cache_tokens=2048, max_prefill_tokens=32)
    yield request.param, model, eng
    eng.close()


def test_lean_path_is_used(arch):
    _, _, eng = arch
    assert eng.path == "lean"


def test_greedy_single_matches_transformers(arch):
    _, model, eng = arch
    for p in PROMPTS:
        ref = hf_greedy(model, p, 24)
        assert eng.generate([p], SamplingParams(temperature=0, max_tokens=24)) == [ref]


def test_greedy_batched_matches_each_alone(arch):
    # different prompt lengths in one batch; the 41-token prompt is prefilled in two chunks
    _, model, eng = arch
    refs = [hf_greedy(model, p, 20) for p in PROMPTS]
    assert eng.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20)) == refs


def test_logits_close_to_transformers(arch):
    # Capture the engine's logits of every step and compare with one HF forward over the
    # final sequence. fp32 with a different summation order (fused matmuls, paged/SDPA
    # attention): agreement to ~1e-5 relative; we allow 1e-4 of the logit scale.
    _, model, eng = arch
    seen = []
    eng.logits_hook = lambda logits: seen.append(logits.clone())
    try:
        prompt = PROMPTS[2]
        out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    finally:
        eng.logits_hook = None
    with torch.no_grad():
        ref = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(out)]
    got = torch.cat(seen)
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("head_major", [False, True])
def test_cpu_decode_attention_matches_kernel_reference(head_major):
    # The lean model's torch-side decode attention (gather + SDPA) against the kernels' ref,
    # on both KV layouts (token-major as on CUDA, head-major as the CPU path allocates):
    # both fp32, different summation order -> ~1e-7; 1e-5 leaves room for other CPUs.
    from slotserve.engine.kv_cache import KVCache, KVLayout
    from slotserve.kernels import paged_decode_attention_ref, store_kv_ref
    from slotserve.models.cpu_ops import paged_decode_attention_sdpa

    g = torch.Generator().manual_seed(0)
    for b, hq, hk, d, bs in [(5, 8, 2, 64, 16), (1, 4, 4, 32, 16), (3, 6, 3, 16, 8)]:
        kc, vc = KVCache(KVLayout(1, 64, bs, hk, d, torch.float32, head_major=head_major), "cpu").layers[0]
        assert kc.shape == (64, bs, hk, d) and kc.is_contiguous() != head_major
        # written through store_kv's reference, as the engine writes it
        store_kv_ref(torch.randn(64 * bs, hk, d, generator=g), torch.randn(64 * bs, hk, d, generator=g), kc, vc,
                     torch.randperm(64 * bs, generator=g))
        tables = torch.randint(0, 64, (b, 7), dtype=torch.int32, generator=g)
        lens = torch.randint(1, 7 * bs + 1, (b,), dtype=torch.int32, generator=g)
        q = torch.randn(b, hq, d, generator=g)
        torch.testing.assert_close(paged_decode_attention_sdpa(q, kc, vc, tables, lens, d ** -0.5),
                                   paged_decode_attention_ref(q, kc, vc, tables, lens, d ** -0.5), rtol=0, atol=1e-5)
