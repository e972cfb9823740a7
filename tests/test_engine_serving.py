"""Serving behaviour of the engine: continuous batching, queueing, preemption, cancellation,
admission errors, seeded sampling, async streaming, failure isolation (OOM, NaN), close.

One tiny random Llama (std 0.2 init so greedy is stable, see test_engine_parity) shared by
the module; engines with different pool sizes are built per test (loading takes ms).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slotserve.engine import AdmissionError, Engine, EngineClosedError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def solo(model_dir):
    """prompt -> greedy output when it runs alone (the reference for every batching test)."""
    eng = Engine.from_pretrained(model_dir, kv_cache_tokens=1024)
    cache = {}

    def run(prompt, params=GREEDY):
        key = (tuple(prompt), params)
        if key not in cache:
            cache[key] = eng.generate([prompt], params)[0]
        return cache[key]

    yield run
    eng.close()


def prompts(n, base=3):
    return [[1] + [(base + 7 * i + 3 * j) % 250 + 3 for j in range(4 + (5 * i) % 23)] for i in range(n)]


def wait_until(cond, timeout=30):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.001)


def test_requests_joining_mid_generation_match_solo(model_dir, solo):
    ps = prompts(6)
    with Engine.from_pretrained(model_dir, kv_cache_tokens=1024, max_prefill_tokens=16) as eng:
        first = eng.submit(ps[0], GREEDY)
        wait_until(lambda: len(first.output_ids) >= 5)
        rest = []
        for p in ps[1:]:
            rest.append(eng.submit(p, GREEDY))
            time.sleep(0.003)   # stagger: later ones join while others decode
        handles = [first] + rest
        outs = [h.result(timeout=60) for h in handles]
        st = eng.stats()
        assert st["prefill_steps"] >= 2 and st["mixed_steps"] >= 1   # prompts joined running decodes
    assert outs == [solo(p) for p in ps]
    assert all(h.finish_reason == "length" for h in handles)


def test_pool_full_queues_fifo_and_preempts_by_recompute(model_dir, solo):
    # 4 blocks of 16 tokens; each request grows to 8 + 40 - 1 = 47 tokens (3 blocks), so the
    # pool holds one at a time: admission queues the rest, and growth forces preemption.
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = [[1, 9, 8, 7, 6, 5, 4, 3], [1, 20, 30, 40, 50, 60, 70, 80], [1, 11, 12, 13, 14, 15, 16, 17]]
    with Engine.from_pretrained(model_dir, kv_cache_tokens=64) as eng:
        assert eng.stats()["total_blocks"] == 4
        handles = [eng.submit(p, params) for p in ps]
        outs = [h.result(timeout=60) for h in handles]
        st = eng.stats()
        assert st["preemptions"] >= 1
        assert st["free_blocks"] == st["total_blocks"]
    assert outs == [solo(p, params) for p in ps]


def test_admission_errors_say_the_numbers(model_dir):
    with Engine.from_pretrained(model_dir, kv_cache_tokens=64, max_model_len=100) as eng:
        with pytest.raises(AdmissionError, match="max_model_len is 100"):
            eng.submit(list(range(3, 103)), GREEDY)
        with pytest.raises(AdmissionError, match="KV pool holds 64"):
            eng.submit([1, 2, 3], SamplingParams(max_tokens=80))
        with pytest.raises(AdmissionError, match="empty"):
            eng.submit([], GREEDY)
        with pytest.raises(AdmissionError, match="vocabulary"):
            eng.submit([1, 256], GREEDY)
        with pytest.raises(AdmissionError):  # generate checks all before queueing any
            eng.generate([[1, 2], []], GREEDY)
        assert eng.stats()["submitted"] == 0
        # the largest request that fits is served (KV for 10 + 55 - 1 = 64 tokens)
        out = eng.generate([[1] * 10], SamplingParams(temperature=0, max_tokens=55, ignore_eos=True))
        assert len(out[0]) == 55
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)      # 0 is valid: prefill only (prompt logprobs)


def test_max_model_len_stops_with_length(model_dir):
    with Engine.from_pretrained(model_dir, max_model_len=20) as eng:
        h = eng.submit([1] * 15, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        assert len(h.result(timeout=30)) == 5 and h.finish_reason == "length"


def test_cancel_frees_blocks_at_once(model_dir):
    with Engine.from_pretrained(model_dir, kv_cache_tokens=256, max_batch=1) as eng:
        total = eng.stats()["total_blocks"]
        long = eng.submit([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        queued = eng.submit([1, 5, 6], GREEDY)          # max_batch=1: waits behind `long`
        wait_until(lambda: len(long.output_ids) >= 3)
        assert eng.stats()["free_blocks"] < total
        queued.cancel()
        assert queued.finish_reason == "cancelled" and eng.stats()["waiting"] == 0
        long.cancel()
        assert long.finish_reason == "cancelled"
        assert eng.stats()["free_blocks"] == total      # no waiting for the next step
        n = len(long.output_ids)
        time.sleep(0.05)
        assert len(long.output_ids) == n                # nothing delivered after cancel
        assert list(long.tokens()) == long.output_ids   # iteration ends cleanly
        assert eng.generate([[1, 7]], GREEDY)[0]        # still serving


def test_stop_tokens_and_eos(model_dir, solo):
    p = [1, 33, 44, 55]
    ref = solo(p)
    stop = ref[5]
    cut = ref[: ref.index(stop) + 1]
    with Engine.from_pretrained(model_dir) as eng:
        h = eng.submit(p, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(stop,), ignore_eos=True))
        assert h.result() == cut and h.finish_reason == "stop"   # the stop token is included
        eng.eos_token_ids = (stop,)                               # EOS from the config works the same way
        h = eng.submit(p, SamplingParams(temperature=0, max_tokens=24))
        assert h.result() == cut and h.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_in_any_batch(model_dir):
    sp = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    ps = prompts(4)
    with Engine.from_pretrained(model_dir) as eng:
        alone = eng.generate([ps[0]], sp)[0]
        again = eng.generate([ps[0]], sp)[0]
        batched = eng.generate(ps, [sp] + [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3)[0]
        other = eng.generate([ps[0]], SamplingParams(temperature=0.9, top_k=50, top_p=0.9, max_tokens=16, seed=99,
                                                     ignore_eos=True))[0]
        greedy = eng.generate([ps[0]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert alone == again == batched
    assert other != alone and greedy != alone


def test_one_requests_huge_top_k_cannot_fail_the_batch(model_dir):
    # top_k beyond the vocabulary means "off"; it must not overflow the batch's int32 tensor.
    ps = prompts(3)
    huge = SamplingParams(temperature=0.8, top_k=2**40, max_tokens=8, seed=1, ignore_eos=True)
    off = SamplingParams(temperature=0.8, top_k=0, max_tokens=8, seed=1, ignore_eos=True)
    normal = SamplingParams(temperature=0.7, max_tokens=8, seed=2, ignore_eos=True)
    with Engine.from_pretrained(model_dir) as eng:
        out = eng.generate(ps, [huge, normal, normal])
        assert out[0] == eng.generate([ps[0]], off)[0]
    assert all(len(o) == 8 for o in out)


def test_async_streaming(model_dir, solo):
    ps = prompts(5)

    async def main(eng):
        async def consume(p, delay):
            await asyncio.sleep(delay)
            h = eng.submit(p, GREEDY)
            return [t async for t in h], h.finish_reason

        return await asyncio.gather(*(consume(p, 0.002 * i) for i, p in enumerate(ps)))

    with Engine.from_pretrained(model_dir) as eng:
        res = asyncio.run(main(eng))
    assert [r[0] for r in res] == [solo(p) for p in ps]
    assert all(r[1] == "length" for r in res)


def test_async_cancel_from_consumer(model_dir):
    async def main(eng):
        h = eng.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        got = []
        async for t in h:
            got.append(t)
            if len(got) == 4:
                h.cancel()
        return got, h

    with Engine.from_pretrained(model_dir) as eng:
        got, h = asyncio.run(main(eng))
        assert h.finish_reason == "cancelled" and 4 <= len(got) < 500
        assert eng.stats()["running"] == 0


def test_injected_oom_fails_only_that_step_and_engine_recovers(model_dir, solo):
    ps = prompts(3)
    with Engine.from_pretrained(model_dir) as eng:
        fired = []

        def hook():
            if eng.stats()["steps"] == 3 and not fired:   # a decode step with all three running
                fired.append(1)
                raise torch.OutOfMemoryError("injected: CUDA out of memory")

        eng.step_hook = hook
        handles = [eng.submit(p, GREEDY) for p in ps]
        for h in handles:
            h.wait(30)
        assert fired
        failed = [h for h in handles if h.finish_reason == "error"]
        assert failed and all(isinstance(h.error, torch.OutOfMemoryError) for h in failed)
        with pytest.raises(torch.OutOfMemoryError):
            failed[0].result()
        assert eng.stats()["free_blocks"] == eng.stats()["total_blocks"]
        eng.step_hook = None
        assert eng.generate(ps, GREEDY) == [solo(p) for p in ps]   # the slot layer's retry works


def test_nan_logits_fail_the_request_with_an_error(model_dir, solo):
    p = prompts(2)
    with Engine.from_pretrained(model_dir) as eng:
        def poison(logits):
            logits[0] = float("nan")   # first sampling row of every step
        eng.logits_hook = poison
        h = eng.submit(p[0], GREEDY)
        h.wait(30)
        assert h.finish_reason == "error" and isinstance(h.error, FloatingPointError)
        with pytest.raises(FloatingPointError):
            list(h.tokens())
        eng.logits_hook = None
        assert eng.generate([p[1]], GREEDY) == [solo(p[1])]


def test_close_fails_pending_and_refuses_new(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch=1)
    hs = [eng.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)) for _ in range(3)]
    eng.close()
    assert all(h.done for h in hs)
    assert any(isinstance(h.error, EngineClosedError) for h in hs)
    assert eng.memory().kv_bytes == 0
    with pytest.raises(EngineClosedError):
        eng.submit([1, 2], GREEDY)
    eng.close()  # idempotent


def test_threads_submit_concurrently(model_dir, solo):
    import concurrent.futures as cf

    ps = prompts(8, base=11)
    with Engine.from_pretrained(model_dir, kv_cache_tokens=256) as eng, cf.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda p: list(eng.submit(p, GREEDY).tokens(timeout=60)), ps))
    assert outs == [solo(p) for p in ps]
