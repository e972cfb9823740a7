"""Prompt logprobs in the engine (`SamplingParams.prompt_logprobs`, what completions' echo +
logprobs needs): every prompt token after the first gets the logprob the model gives it, and
its top alternatives, checked against a transformers fp32 forward pass of the same weights.

Covered: the lean path and the transformers fallback; a prompt prefilled in several chunks;
`max_tokens=0` (prefill only); a prefix-cache hit (the same prompt computed before by an
ordinary request, and by a scoring one); a batch mixing scoring and ordinary requests, whose
outputs must not change; a scoring sequence preempted and recomputed.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slotserve.engine import Engine, SamplingParams
from slotserve.engine import scheduler as scheduler_mod

TOL = 1e-3       # fp32 both sides; the lean model's fused ops round differently from transformers'


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    m.save_pretrained(path, safe_serialization=True)
    return path, m


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 256, (n - 1,), generator=g).tolist()


def reference(m, ids: list[int]) -> torch.Tensor:
    """log-softmax [len - 1, V] of the positions that predict tokens 1..len-1."""
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids])).logits[0, :-1].float(), -1)


def check(m, ids, got, top_n):
    want = reference(m, ids)
    assert len(got) == len(ids) - 1
    for p, e in enumerate(got):
        tok = ids[p + 1]
        assert abs(e.logprob - want[p, tok].item()) < TOL, (p, e.logprob, want[p, tok].item())
        assert len(e.top) == top_n
        top = want[p].topk(top_n)
        assert [i for i, _ in e.top] == top.indices.tolist(), p
        assert torch.allclose(torch.tensor([x for _, x in e.top]), top.values, atol=TOL)


def wait_until(cond, timeout=30):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize("impl", ["lean", "transformers"])
def test_prompt_logprobs_match_transformers(model, impl):
    path, m = model
    with Engine.from_pretrained(path, kv_cache_tokens=2048, max_prefill_tokens=64, model_impl=impl) as eng:
        for n in (1, 2, 17, 150):                      # 150 > 64: prefilled in three chunks
            ids = prompt(n, seed=n)
            h = eng.submit(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=4))
            out = h.result(timeout=60)
            check(m, ids, h.prompt_logprobs, 4)
            assert len(out) == 3 and h.logprobs == []   # output logprobs stay off unless asked
        if impl == "lean":                             # (the fallback prefills a whole prompt per step)
            assert eng.stats()["prefill_steps"] >= 3 + 1 + 1 + 1


def test_max_tokens_zero_scores_the_prompt_only(model):
    path, m = model
    ids = prompt(40, seed=7)
    with Engine.from_pretrained(path, kv_cache_tokens=1024) as eng:
        h = eng.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert h.result(timeout=60) == [] and h.finish_reason == "length"
        check(m, ids, h.prompt_logprobs, 0)
        plain = eng.submit(ids, SamplingParams(max_tokens=0))       # prefill only: warms the prefix cache
        assert plain.result(timeout=60) == [] and plain.prompt_logprobs == []
        assert eng.stats()["running"] == 0 and eng.stats()["free_blocks"] == eng.stats()["total_blocks"]


def test_a_prefix_cache_hit_does_not_skip_scored_positions(model):
    path, m = model
    ids = prompt(100, seed=11)                         # 6 full blocks of 16
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    with Engine.from_pretrained(path, kv_cache_tokens=2048, enable_prefix_caching=True) as eng:
        first = eng.generate([ids], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
        assert eng.stats()["cached_blocks"] >= 6       # the ordinary request left the prompt in the cache
        a = eng.submit(ids, sp)
        assert a.result(timeout=60) == first
        assert a.cached_tokens == 0                    # it computed every position it scores
        check(m, ids, a.prompt_logprobs, 2)
        b = eng.submit(ids, sp)                        # the same scoring request again
        assert b.result(timeout=60) == first
        assert [(e.logprob, e.top) for e in b.prompt_logprobs] == [(e.logprob, e.top) for e in a.prompt_logprobs]
        c = eng.submit(ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        c.result(timeout=60)
        assert c.cached_tokens == 96                   # ordinary requests still hit the cache


def test_scoring_mixed_with_ordinary_requests(model):
    path, m = model
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ordinary = [prompt(9, seed=20), prompt(33, seed=21), prompt(5, seed=22)]
    scoring = [prompt(70, seed=30), prompt(12, seed=31)]
    with Engine.from_pretrained(path, kv_cache_tokens=4096, max_prefill_tokens=32) as eng:
        solo = eng.generate(ordinary, greedy)
        handles = [eng.submit(p, greedy) for p in ordinary]
        wait_until(lambda: all(len(h.output_ids) >= 2 for h in handles))   # decoding when the scoring ones arrive
        scored = [eng.submit(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, prompt_logprobs=3,
                                               logprobs=1))
                  for p, n in zip(scoring, (4, 0))]
        assert [h.result(timeout=60) for h in handles] == solo
        for h, p in zip(scored, scoring):
            h.result(timeout=60)
            check(m, p, h.prompt_logprobs, 3)
        assert len(scored[0].logprobs) == 4 and scored[1].output_ids == []
        assert eng.stats()["mixed_steps"] >= 1


def test_scoring_is_chunked_and_survives_preemption(model, monkeypatch):
    path, m = model
    monkeypatch.setattr(scheduler_mod, "MAX_SCORED_TOKENS", 24)   # bound on scored positions per step
    ids = prompt(90, seed=40)
    with Engine.from_pretrained(path, kv_cache_tokens=160, max_batch=2, enable_prefix_caching=True) as eng:
        # two sequences that outgrow a 160-token pool: one is preempted and recomputed
        long = eng.submit(prompt(20, seed=41), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        h = eng.submit(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1))
        long.result(timeout=120), h.result(timeout=120)
        stats = eng.stats()
        assert stats["preemptions"] >= 1, stats
        check(m, ids, h.prompt_logprobs, 1)             # scored once: a recompute adds nothing
        assert stats["prefill_steps"] >= 90 // 24
