"""Loading: safetensors-only, bundle dirs + serving.json, shared tensor pool, dtype rules,
rope frequencies, and the transformers fallback for architectures the lean model lacks."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from slotserve.engine import Engine, SamplingParams
from slotserve.engine.kv_cache import BlockAllocator
from slotserve.engine.weights import TensorPool
from slotserve.models.checkpoint import WeightsError
from slotserve.models.llama import LeanConfig, rope_inv_freq

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 3], [1, 5], list(range(30, 60))]


def llama_cfg(**kw):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2,
                       bos_token_id=1, eos_token_id=2, **kw)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(llama_cfg()).eval().save_pretrained(path, safe_serialization=True)
    return path


def make_bundle(root, model_dir, serving: dict):
    """A bundle directory laid out as the store writes it (manifest with file hashes)."""
    (root / "model").mkdir(parents=True)
    files = {}
    for f in model_dir.iterdir():
        shutil.copy(f, root / "model" / f.name)
        files[f"model/{f.name}"] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
    (root / "serving.json").write_text(json.dumps(serving))
    (root / "manifest.json").write_text(json.dumps({"name": "t", "version": 1, "files": files}))
    return root


def test_refuses_pickle_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(llama_cfg().to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="safetensors only.*pytorch_model.bin|pytorch_model.bin.*safetensors"):
        Engine.from_pretrained(tmp_path)


def test_bundle_serving_json_defaults_and_overrides(tmp_path, llama_dir):
    b = make_bundle(tmp_path / "b", llama_dir,
                    {"dtype": "auto", "max_model_len": 64, "max_batch": 3, "kv_cache_tokens": 96})
    with Engine.from_pretrained(b) as eng:
        st = eng.stats()
        assert (st["max_model_len"], st["max_batch"], st["kv_capacity_tokens"]) == (64, 3, 96)
        assert eng.path == "lean" and eng.runner.model.dtype == torch.float32   # auto on CPU
    with Engine.from_pretrained(b, max_model_len=100, max_batch=5, kv_cache_tokens=160) as eng:
        st = eng.stats()
        assert (st["max_model_len"], st["max_batch"], st["kv_capacity_tokens"]) == (100, 5, 160)
    with pytest.raises(ValueError, match="exceeds"):
        Engine.from_pretrained(b, max_model_len=4096)


def test_kv_cache_bytes_and_bf16(tmp_path, llama_dir):
    # 2 layers * 2 kv heads * 16 dims * 2 (k, v) * 2 bytes = 256 bytes per bf16 token
    b = make_bundle(tmp_path / "b", llama_dir, {"dtype": "bfloat16", "kv_cache_bytes": 256 * 320})
    with Engine.from_pretrained(b) as eng, Engine.from_pretrained(llama_dir) as eng32:
        assert eng.stats()["kv_capacity_tokens"] == 320 and eng.memory().kv_bytes == 256 * 320
        assert eng.memory().weight_bytes * 2 == eng32.memory().weight_bytes
        assert len(eng.generate([PROMPTS[0]], GREEDY)[0]) == 16


def test_tensor_pool_shares_identical_weights(tmp_path, llama_dir):
    pool = TensorPool()
    a = Engine.from_pretrained(llama_dir, tensor_pool=pool)
    b = Engine.from_pretrained(llama_dir, tensor_pool=pool)      # content-hash keys
    ma, mb = a.memory(), b.memory()
    assert ma.weight_bytes == mb.weight_bytes > 0
    assert ma.shared_weight_bytes == mb.shared_weight_bytes == ma.weight_bytes
    assert a.runner.model.layers[0].qkv.data_ptr() == b.runner.model.layers[0].qkv.data_ptr()
    assert a.generate(PROMPTS, GREEDY) == b.generate(PROMPTS, GREEDY)
    a.close()
    assert b.memory().shared_weight_bytes == 0                      # sole holder now
    assert b.generate([PROMPTS[0]], GREEDY)
    b.close()
    assert len(pool) == 0

    # different weights share only what is truly identical: the RMSNorm weights, all ones
    # at init (the five of them are one [64] fp32 tensor, 256 bytes, even inside one model)
    torch.manual_seed(3)
    other = tmp_path / "other"
    LlamaForCausalLM(llama_cfg()).save_pretrained(other, safe_serialization=True)
    with Engine.from_pretrained(llama_dir, tensor_pool=pool) as x, Engine.from_pretrained(other, tensor_pool=pool) as y:
        assert x.memory().shared_weight_bytes == y.memory().shared_weight_bytes == 64 * 4


def test_bundles_with_identical_weight_files_share_everything(tmp_path, llama_dir):
    pool = TensorPool()
    b1 = make_bundle(tmp_path / "b1", llama_dir, {"max_model_len": 64})
    b2 = make_bundle(tmp_path / "b2", llama_dir, {"max_model_len": 128, "max_batch": 2})  # config-only change
    with Engine.from_pretrained(b1, tensor_pool=pool) as e1, Engine.from_pretrained(b2, tensor_pool=pool) as e2:
        assert e2.memory().shared_weight_bytes == e2.memory().weight_bytes
        assert any(k[0] == "file" for k in pool._entries)              # keyed by the manifest's hashes
        assert e1.generate(PROMPTS, GREEDY) == e2.generate(PROMPTS, GREEDY)


def test_rope_inv_freq_matches_transformers():
    for rope in ({"rope_type": "default", "rope_theta": 10000.0},
                 {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                 {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}):
        cfg = llama_cfg(rope_parameters=dict(rope), architectures=["LlamaForCausalLM"])
        lean = LeanConfig.from_hf(cfg)
        fn = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
        ref = fn(cfg)[0] if fn else 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
        torch.testing.assert_close(rope_inv_freq(lean), ref, rtol=0, atol=0)


def test_unsupported_rope_falls_back_with_reason():
    cfg = llama_cfg(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                     "original_max_position_embeddings": 64}, architectures=["LlamaForCausalLM"])
    assert "yarn" in LeanConfig.from_hf(cfg)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(4)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128, initializer_range=0.2,
                     bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_fallback_path_matches_transformers(gpt2):
    model, path = gpt2
    refs = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16, pad_token_id=0)[0, len(p):].tolist()
            for p in PROMPTS]
    with Engine.from_pretrained(path, kv_cache_tokens=512) as eng:
        assert eng.path == "transformers" and "GPT2LMHeadModel" in eng.fallback_reason
        assert eng.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16)) == refs
        assert eng.memory().weight_bytes > 0 and eng.memory().kv_bytes == 0
    with pytest.raises(ValueError, match="lean model cannot serve"):
        Engine.from_pretrained(path, model_impl="lean")


def test_fallback_queues_preempts_and_cancels(gpt2):
    model, path = gpt2
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = [[1, 9, 8, 7, 6, 5, 4, 3], [1, 20, 30, 40, 50, 60, 70, 80]]
    with Engine.from_pretrained(path, kv_cache_tokens=1024) as roomy:
        solo = [roomy.generate([p], params)[0] for p in ps]
    with Engine.from_pretrained(path, kv_cache_tokens=64) as eng:
        assert eng.generate(ps, params) == solo
        assert eng.stats()["preemptions"] >= 1
        h = eng.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        h.cancel()
        assert h.finish_reason == "cancelled" and eng.stats()["free_blocks"] == eng.stats()["total_blocks"]
        assert not eng.runner._caches


def test_transformers_impl_on_a_lean_arch_gives_the_same_tokens(llama_dir):
    with Engine.from_pretrained(llama_dir) as lean, Engine.from_pretrained(llama_dir, model_impl="transformers") as hf:
        assert (lean.path, hf.path) == ("lean", "transformers")
        assert lean.generate(PROMPTS, GREEDY) == hf.generate(PROMPTS, GREEDY)


def test_block_allocator():
    a = BlockAllocator(4, 16)
    got = a.allocate(3)
    assert a.num_free == 1 and not a.can_allocate(2)
    with pytest.raises(RuntimeError, match="exhausted"):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4 and got == []
    with pytest.raises(AssertionError, match="double free"):
        a.free([0])
    # lowest ids first, and the block after a sequence's last when free (keeps tables consecutive)
    first = a.allocate(2)
    assert first == [0, 1] and a.allocate_after(1) == 2
    assert a.allocate(1) == [3]
    a.free([0])
    assert a.allocate_after(2) == 0          # 3 is taken: lowest free instead
    b = BlockAllocator(16, 16)                # CPU admission: middle of the largest free run
    assert b.allocate_spread(2) == [0, 1] and b.allocate_spread(2) == [8, 9] and b.allocate_spread(1) == [4]
    assert b.allocate_after(1) == 2 and b.allocate_after(9) == 10
