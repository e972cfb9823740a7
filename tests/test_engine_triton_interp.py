"""The lean engine through the Triton kernels (not the torch refs), on CPU via Triton's interpreter.

Checks the CUDA code path's kernel calls (shapes, strides, mixed decode + chunked prefill
steps, paged decode attention, sampling) without a GPU. Runs in a fresh process: Triton
reads TRITON_INTERPRET at import time (see slotserve.kernels.testing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from slotserve.engine import Engine, SamplingParams
    out = {}
    for name, C, M, kw in [("qwen3", Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),
                           ("llama", LlamaConfig, LlamaForCausalLM, {})]:
        torch.manual_seed(0)   # std 0.2 init: well separated logits (see test_engine_parity)
        cfg = C(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2, **kw)
        model = M(cfg).eval()
        path = f"{sys.argv[1]}/{name}"
        model.save_pretrained(path)
        prompts = [[1, 5, 9, 20, 33], [7, 8], list(range(10, 40))]
        refs = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        with Engine.from_pretrained(path, kv_cache_tokens=512, max_prefill_tokens=16) as eng:
            got = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            sp = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=4, ignore_eos=True)
            seeded = [eng.generate([prompts[0]], sp)[0], eng.generate(prompts, [sp] * 3)[0]]
            mixed = eng.stats()["mixed_steps"]
        out[name] = {"got": got, "refs": refs, "seeded": seeded, "mixed": mixed}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the GPU tests run the real kernels")
def test_engine_on_triton_kernels_in_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", SLOTSERVE_KERNELS="triton")
    proc = subprocess.run([sys.executable, "-P", "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, r in res.items():
        assert r["got"] == r["refs"], name
        assert r["seeded"][0] == r["seeded"][1], name
        assert r["mixed"] >= 1, name
