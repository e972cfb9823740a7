"""CUDA-only checks: Triton kernels + CUDA-graph decode agree with eager and with transformers."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from slotserve.engine import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 3, 250, 77], [1, 5], list(range(30, 71)), [1, 200, 201, 9, 9, 12, 64],
           [1, 3, 5, 7, 9, 11], [1, 100]]   # 6 rows: graphs for 8 replay with 2 padding rows


def _save(cls, cfg, path):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, initializer_range=0.2,
                  bos_token_id=None, eos_token_id=None)
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        model = _save(LlamaForCausalLM, LlamaConfig(**common), path)
    else:
        model = _save(Qwen3ForCausalLM, Qwen3Config(**common, head_dim=64), path)
    return model, path


def test_fp32_cuda_graphs_match_transformers_and_eager(tiny):
    _, path = tiny
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    refs = [model.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=24,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    with Engine.from_pretrained(path, device="cuda", dtype="float32", max_batch=8) as eng:
        assert eng.runner.graphs is not None, "decode graphs were not captured"
        graphed = eng.generate(PROMPTS, GREEDY)
        alone = [eng.generate([p], GREEDY)[0] for p in PROMPTS]
    with Engine.from_pretrained(path, device="cuda", dtype="float32", enforce_eager=True) as eng:
        assert eng.runner.graphs is None
        eager = eng.generate(PROMPTS, GREEDY)
    assert graphed == eager == alone
    agree = sum(a == b for a, b in zip(graphed, refs))
    assert agree >= len(PROMPTS) - 1, (graphed, refs)   # fp32 on GPU: TF32-free, ties are rare


def test_bf16_logits_close_to_transformers(tiny):
    # bf16 rounds at different points than HF (fused norms, fp32 rope); compare logits at a
    # tolerance of a few bf16 ulps of the logit scale rather than exact tokens.
    _, path = tiny
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    seen = []
    with Engine.from_pretrained(path, device="cuda", dtype="bfloat16") as eng:
        eng.logits_hook = lambda x: seen.append(x.clone())
        out = eng.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    seq = PROMPTS[2] + out
    with torch.no_grad():
        ref = hf(torch.tensor([seq], device="cuda")).logits[0, len(PROMPTS[2]) - 1: -1].float()
    got = torch.cat(seen)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 0.05 * scale


def test_seeded_sampling_on_cuda(tiny):
    _, path = tiny
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=16, seed=7, ignore_eos=True)
    with Engine.from_pretrained(path, device="cuda", max_batch=8) as eng:
        a = eng.generate([PROMPTS[0]], sp)[0]
        b = eng.generate(PROMPTS[:4], [sp] + [SamplingParams(temperature=1.0, max_tokens=16)] * 3)[0]
    assert a == b


def test_capture_and_recapture_beside_a_decoding_engine(tiny, monkeypatch):
    """Engine B captures its decode graphs (at load, and again when unparked) while engine A
    decodes in its step thread, replaying its own graphs. Before per-engine streams and
    thread-local capture, A's steps failed with "operation not permitted when stream is
    capturing". Both must give eager's tokens, and A must have stepped during each capture."""
    import threading

    from slotserve.engine import cuda_graphs

    _, path = tiny
    kw = dict(device="cuda", dtype="float32", max_batch=8)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with Engine.from_pretrained(path, enforce_eager=True, **kw) as ref:
        want = ref.generate(PROMPTS, sp)
    a = Engine.from_pretrained(path, **kw)
    b = None
    assert a.runner.graphs is not None
    stop, outs, errors, during = threading.Event(), [], [], []

    def keep_a_busy():
        try:
            while not stop.is_set():
                outs.append(a.generate(PROMPTS, sp))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    real_init = cuda_graphs.DecodeGraphs.__init__

    def watched(self, *args, **kwargs):   # A's steps taken while B captures
        s0 = a.stats()["steps"]
        real_init(self, *args, **kwargs)
        during.append(a.stats()["steps"] - s0)

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "__init__", watched)
    busy = threading.Thread(target=keep_a_busy, daemon=True)
    busy.start()
    try:
        while a.stats()["steps"] < 4 and not errors:
            time.sleep(0.001)
        b = Engine.from_pretrained(path, **kw)            # capture #1, beside A
        assert b.runner.graphs is not None, "B's graphs were not captured"
        assert b.generate(PROMPTS, sp) == want
        assert b.park() > 0 and b.runner.graphs is None and b.memory().kv_bytes == 0
        assert b.unpark() > 0                             # capture #2, beside A
        assert b.runner.graphs is not None, "B's graphs were not recaptured"
        assert b.generate(PROMPTS, sp) == want
    finally:
        stop.set()
        busy.join(120)
        a.close()
        if b is not None:
            b.close()
    assert not errors, errors
    assert len(during) == 2 and all(n > 0 for n in during), during   # A really ran during both
    assert outs and all(o == want for o in outs)
