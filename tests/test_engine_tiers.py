"""Engine.park / unpark (weights to host and back, KV pool and graphs dropped and rebuilt),
tensor-pool sharing while parked, and pool claims released when a load fails partway.

On CPU the host copy is a clone: the code path a GPU takes, minus the DMA and pinning."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from slotserve.engine import Engine, EngineParkedError, SamplingParams
import slotserve.engine.kv_cache as kv_cache_mod
from slotserve.engine.weights import TensorPool

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 3], [1, 5], list(range(30, 60))]


def _llama(path, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("llama"), 2)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("other"), 3)   # shares only the all-ones RMSNorm weights


def test_park_unpark_round_trip(llama_dir):
    with Engine.from_pretrained(llama_dir, kv_cache_tokens=256) as eng:
        want = eng.generate(PROMPTS, GREEDY)
        before = {id(t) for t in eng.weight_tensors()}
        weight_bytes, kv_bytes = eng.memory().weight_bytes, eng.memory().kv_bytes
        moved = eng.park(pin_memory=True)               # pinning is a no-op on CPU
        assert moved == weight_bytes > 0 and eng.tier == "host"
        st = eng.parked
        assert (st.moved_bytes, st.shared_bytes, st.kv_bytes, st.pinned) == (moved, 0, kv_bytes, False)
        assert eng.memory().kv_bytes == 0 and eng.stats()["tier"] == "host"
        assert before.isdisjoint(id(t) for t in eng.weight_tensors())       # host copies
        with pytest.raises(EngineParkedError, match="parked.*unpark"):
            eng.submit(PROMPTS[0], GREEDY)
        assert eng.park() == 0                          # idempotent
        assert eng.unpark() == weight_bytes
        assert eng.tier == "device" and eng.parked is None and eng.memory().kv_bytes == kv_bytes
        assert eng.unpark() == 0
        assert eng.generate(PROMPTS, GREEDY) == want


def test_park_refused_while_requests_run(llama_dir):
    with Engine.from_pretrained(llama_dir) as eng:
        eng.step_hook = lambda: __import__("time").sleep(0.01)
        h = eng.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        with pytest.raises(RuntimeError, match="cannot park: 1 requests"):
            eng.park()
        assert eng.tier == "device"
        h.cancel()
        eng.step_hook = None
        assert eng.park() > 0                           # waits for a step still in flight
        eng.unpark()
        assert eng.generate([PROMPTS[1]], GREEDY)


def test_park_moves_nothing_shared_with_another_engine(llama_dir):
    pool = TensorPool()
    with Engine.from_pretrained(llama_dir, tensor_pool=pool) as live, \
            Engine.from_pretrained(llama_dir, tensor_pool=pool) as prev:
        want = live.generate(PROMPTS, GREEDY)
        ptrs = [t.data_ptr() for t in live.weight_tensors()]
        refs = pool.refcounts()
        assert prev.park() == 0                         # every tensor is live's too
        assert prev.parked.shared_bytes == prev.memory().weight_bytes and prev.parked.kv_bytes > 0
        assert pool.refcounts() == refs                 # prev keeps its claims: nothing left the pool
        assert [t.data_ptr() for t in live.weight_tensors()] == ptrs
        assert all(t.device.type == "cpu" for t in prev.weight_tensors())
        assert live.generate(PROMPTS, GREEDY) == want
        assert prev.unpark() == 0 and prev.generate(PROMPTS, GREEDY) == want


def test_park_moves_only_the_exclusive_part(llama_dir, other_dir):
    pool = TensorPool()
    with Engine.from_pretrained(llama_dir, tensor_pool=pool) as x, \
            Engine.from_pretrained(other_dir, tensor_pool=pool) as y:
        want = y.generate(PROMPTS, GREEDY)
        refs = pool.refcounts()
        w = y.memory().weight_bytes
        assert y.park() == w - 64 * 4 and y.parked.shared_bytes == 64 * 4   # the shared norm stays
        assert y.memory().shared_weight_bytes == 64 * 4
        assert pool.held_bytes(y._owner) == 64 * 4      # its exclusive entries left the pool
        assert y.unpark() == w - 64 * 4
        assert pool.refcounts() == refs                 # and came back under the same keys
        assert y.generate(PROMPTS, GREEDY) == want and x.generate(PROMPTS, GREEDY)
    assert len(pool) == 0


def test_unpark_shares_what_another_engine_loaded_meanwhile(llama_dir):
    pool = TensorPool()
    with Engine.from_pretrained(llama_dir, tensor_pool=pool) as a:
        want = a.generate(PROMPTS, GREEDY)
        assert a.park() == a.memory().weight_bytes and len(pool) == 0
        with Engine.from_pretrained(llama_dir, tensor_pool=pool) as b:
            assert a.unpark() == 0                      # every tensor is a pool hit: nothing copied
            assert a.memory().shared_weight_bytes == a.memory().weight_bytes
            assert a.generate(PROMPTS, GREEDY) == want == b.generate(PROMPTS, GREEDY)
    assert len(pool) == 0


def test_failed_unpark_leaves_engine_parked(llama_dir, monkeypatch):
    pool = TensorPool()
    with Engine.from_pretrained(llama_dir, tensor_pool=pool) as eng:
        want = eng.generate(PROMPTS, GREEDY)
        eng.park()
        refs = pool.refcounts()

        def oom(*a, **k):
            raise torch.OutOfMemoryError("injected: no room for the KV pool")
        with monkeypatch.context() as m:
            m.setattr(kv_cache_mod, "KVCache", oom)
            with pytest.raises(torch.OutOfMemoryError):
                eng.unpark()
        assert eng.tier == "host" and pool.refcounts() == refs   # re-acquired claims dropped again
        with pytest.raises(EngineParkedError):
            eng.submit(PROMPTS[0], GREEDY)
        assert eng.unpark() > 0 and eng.generate(PROMPTS, GREEDY) == want


def test_close_while_parked_releases_everything(llama_dir):
    pool = TensorPool()
    eng = Engine.from_pretrained(llama_dir, tensor_pool=pool)
    eng.park()
    eng.close()
    assert len(pool) == 0 and eng.closed
    with pytest.raises(Exception, match="closed"):
        eng.unpark()


def test_transformers_fallback_parks_too(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)).eval() \
        .save_pretrained(tmp_path, safe_serialization=True)
    with Engine.from_pretrained(tmp_path) as eng:
        assert eng.path == "transformers"
        want = eng.generate([[1, 2, 3]], GREEDY)
        params = [id(p) for p in eng.runner.model.parameters()]
        moved = eng.park()
        assert moved > 0 and eng.parked.kv_bytes == 0
        assert [id(p) for p in eng.runner.model.parameters()] == params   # same Parameter objects
        assert eng.unpark() == moved
        assert eng.generate([[1, 2, 3]], GREEDY) == want


@pytest.mark.parametrize("where", ["KVCache", "LeanRunner"])
def test_failed_load_releases_pool_claims(llama_dir, other_dir, monkeypatch, where):
    """An OOM partway through from_pretrained (after weights were claimed from / added to
    the shared pool) leaves the pool exactly as it was."""
    import slotserve.engine.runner as runner_mod

    pool = TensorPool()
    with Engine.from_pretrained(llama_dir, tensor_pool=pool) as live:
        refs, held = pool.refcounts(), pool.held_bytes()

        def oom(*a, **k):
            raise torch.OutOfMemoryError(f"injected OOM in {where}")
        with monkeypatch.context() as m:
            m.setattr(kv_cache_mod if where == "KVCache" else runner_mod, where, oom)
            for path in (llama_dir, other_dir):          # claims on live's entries / new entries
                with pytest.raises(torch.OutOfMemoryError, match="injected"):
                    Engine.from_pretrained(path, tensor_pool=pool)
                assert pool.refcounts() == refs and pool.held_bytes() == held
        assert live.generate([PROMPTS[0]], GREEDY)       # untouched
        with Engine.from_pretrained(other_dir, tensor_pool=pool) as ok:   # and loading still works
            assert ok.memory().shared_weight_bytes == 64 * 4
    assert len(pool) == 0
