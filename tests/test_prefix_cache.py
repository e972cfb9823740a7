"""Automatic prefix caching (serve/prefix_cache.py, the allocator's refcounts and cached
free blocks in serve/kv_cache.py, admission in serve/scheduler.py).

Pure parts first (allocator, keys, scheduler without a model), then the engine on the
tiny random models of test_engine_parity (std 0.2 init: greedy is stable, see there),
where caching on must give exactly the tokens of caching off and of transformers.
Block size is the engine's default, 16, throughout.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from slotserve.bundles.manifest import BundleError
from slotserve.bundles.source import normalize_serving
from slotserve.engine import Engine, SamplingParams
from slotserve.engine.kv_cache import BlockAllocator
from slotserve.engine.prefix_cache import block_key, prefix_keys
from slotserve.engine.scheduler import Scheduler, Sequence, SeqStatus

# the parity tests' model builders and transformers reference (not importable by name:
# tests are no package, and the repository root is never on sys.path)
_spec = importlib.util.spec_from_file_location("_parity_helpers", Path(__file__).with_name("test_engine_parity.py"))
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

BS = 16


def greedy(n, ignore_eos=False):
    """Greedy; stops at EOS like transformers `generate` unless `ignore_eos` (engine-only comparisons)."""
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=ignore_eos)


def toks(n, seed):
    """n token ids in [3, 253), distinct per seed (no BOS/EOS ids)."""
    return [(seed * 31 + 7 * j + (j * j) % 13) % 250 + 3 for j in range(n)]


def wait_until(cond, timeout=30):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.001)


# ------------------------------------------------------------------------- allocator (pure)
def test_refcounts_keep_shared_blocks_and_free_cached_ones_stay_matchable():
    a = BlockAllocator(4, BS)
    x, y = a.allocate(2)
    assert a.register(x, b"kx") and a.register(y, b"ky")
    a.share(x)                                   # a second sequence hits x
    assert a.refcount(x) == 2 and a.num_free == 2 and a.num_cached == 2
    a.free([x, y])                               # the first sequence ends
    assert a.refcount(x) == 1 and a.refcount(y) == 0
    assert a.num_free == 3                       # y is free (evictable) ...
    assert a.lookup(b"ky") == y                  # ... and still holds its content
    a.share(y)                                   # a hit on a free cached block takes it back
    assert a.num_free == 2 and a.refcount(y) == 1
    a.free([x])
    a.free([y])
    assert a.num_free == 4 and a.num_cached == 2
    with pytest.raises(AssertionError, match="double free"):
        a.free([x])
    with pytest.raises(AssertionError, match="not cached"):
        a.share(a.allocate(1)[0])                # only registered blocks are shared


def test_register_refuses_a_duplicate_key_and_keeps_the_first():
    a = BlockAllocator(4, BS)
    b1, b2 = a.allocate(2)
    assert a.register(b1, b"k") and not a.register(b2, b"k")
    assert a.lookup(b"k") == b1 and a.num_cached == 1
    a.free([b1, b2])
    assert a.num_free == 4 and a.num_cached == 1   # b2 went back holding nothing cached


def test_eviction_prefers_empty_blocks_then_least_recently_used():
    a = BlockAllocator(6, BS)
    seq1 = a.allocate(3)                       # [0, 1, 2]
    seq2 = a.allocate(2)                       # [3, 4]
    for b in seq1 + seq2:
        a.register(b, f"k{b}".encode())
    a.free(seq1)                               # tail first: LRU order 2, 1, 0
    a.free(seq2)                               # then 4, 3
    assert a.num_free == 6 and a.num_cached == 5
    assert a.allocate(1) == [5]                # the one block holding nothing cached goes first
    a.share(a.lookup(b"k2"))                   # a hit refreshes block 2 ...
    a.free([2])                                # ... it is now the most recently used
    got = a.allocate(3)
    assert got == [1, 0, 4] and a.num_evicted == 3
    for b in got:                              # evicted: their keys never match again
        assert a.lookup(f"k{b}".encode()) is None
    assert a.lookup(b"k3") == 3 and a.lookup(b"k2") == 2
    assert a.num_cached == 2 and a.num_free == 2
    a.free(got)
    assert a.num_free == 5 and a.num_cached == 2   # reused blocks came back uncached


def test_consecutive_preferences_use_empty_blocks_and_clear_forgets_everything():
    a = BlockAllocator(8, BS)
    first = a.allocate(4)                      # [0, 1, 2, 3]
    for b in first[:2]:
        a.register(b, f"k{b}".encode())
    a.free(first)                              # 0, 1 cached-free; 2, 3 empty
    assert a.allocate_after(0) == 2            # 1 is free but cached: not taken for adjacency
    assert a.allocate_spread(3) == [4, 5, 6]   # middle of the largest empty run (3-7), not the cached 0-1
    assert a.lookup(b"k0") == 0 and a.lookup(b"k1") == 1
    a.clear_cached()                           # the KV pool was dropped (park)
    assert a.num_cached == 0 and a.lookup(b"k0") is None and a.num_free == 4
    assert a.allocate(2) == [0, 1]             # plain free blocks again, lowest id first


def test_cpu_spread_in_a_pool_full_of_cache_takes_a_consecutive_window_with_room():
    a = BlockAllocator(12, BS)
    tables = [a.allocate(4) for _ in range(3)]          # [0-3] [4-7] [8-11]
    for t in tables:
        for b in t:
            a.register(b, f"k{b}".encode())
    for t in tables:
        a.free(t)                                        # 0-3 released first: the oldest
    got = a.allocate_spread(3, room=1)                   # no empty run of 3: evict a window of 3 + 1
    assert got == [0, 1, 2, 3]                           # the oldest release, its room held too
    assert a.num_evicted == 4 and all(a.refcount(b) == 1 for b in got)
    assert a.lookup(b"k4") == 4 and a.lookup(b"k11") == 11
    a.free(got)                                          # 0-3 come back holding nothing cached
    got = a.allocate_spread(6)                           # largest empty run is 4: a window of 6
    assert got == [0, 1, 2, 3, 4, 5]                     # the fewest cached blocks to evict (4, 5)
    assert a.lookup(b"k4") is None and a.lookup(b"k5") is None and a.lookup(b"k6") == 6
    # fewer cached blocks beats older ones: evicting one recent block, not two old ones
    c = BlockAllocator(6, BS)
    held = c.allocate(6)
    for b in (0, 1, 3):
        c.register(b, f"k{b}".encode())
    c.free([0, 1])                                       # oldest release
    c.free([4])                                          # nothing cached
    c.free([3])                                          # newest release; 2 and 5 stay held
    assert c.allocate_spread(2) == [3, 4] and c.lookup(b"k0") == 0 and c.lookup(b"k3") is None
    assert held[2] == 2 and c.refcount(2) == 1


def test_keys_are_chained_sha256_over_the_whole_prefix():
    p = list(range(3, 3 + 3 * BS))
    keys = prefix_keys(p, BS, 3)
    assert len(keys) == 3 and all(len(k) == 32 for k in keys)
    q = [99] + p[1:]                           # differs only in block 0
    kq = prefix_keys(q, BS, 3)
    assert kq[0] != keys[0] and kq[1] != keys[1] and kq[2] != keys[2]   # every later key changes
    assert prefix_keys(p + [5, 6], BS, 3) == keys                        # tokens past the blocks don't count
    known = prefix_keys(p, BS, 1)
    assert prefix_keys(p, BS, 3, known) is known and known == keys       # extended incrementally
    assert block_key(keys[0], p[BS:2 * BS]) == keys[1]
    assert block_key(keys[0], [t + 256 for t in p[BS:2 * BS]]) != keys[1]   # ids are not truncated to bytes


# ------------------------------------------------------------------------- scheduler (pure)
def _seq(i, ids, max_tokens=4):
    return Sequence(seq_id=i, prompt_len=len(ids), token_ids=list(ids), max_tokens=max_tokens,
                    stop_ids=frozenset(), seed=0)


def _sched(num_blocks, bs=4, **kw):
    return Scheduler(BlockAllocator(num_blocks, bs), max_batch=8, max_model_len=64, max_prefill_tokens=64,
                     prefix_caching=True, **kw)


def _run(s, batch, token=7):
    """postprocess a batch as a successful step that samples `token` on every sampling row."""
    return s.postprocess(batch, {i: token for i, f in enumerate(batch.samples) if f})


def test_scheduler_registers_only_after_a_step_and_shares_at_admission():
    s = _sched(8)
    a = _seq(0, list(range(10, 20)))             # 10 tokens: blocks of 4, 4, 2
    s.add(a)
    batch = s.schedule()
    assert (batch.starts, batch.ends) == ([0], [10])
    assert s.alloc.num_cached == 0               # nothing registered before the step ran
    _run(s, batch)
    assert s.alloc.num_cached == 2               # the two full blocks; the partial one is not
    b = _seq(1, list(range(10, 19)) + [50, 51])  # shares 9 tokens = 2 full blocks
    s.add(b)
    batch = s.schedule()
    assert batch.seqs == [a, b] and batch.num_decode == 1
    assert (batch.starts[1], batch.ends[1]) == (8, 11)          # starts after the cached prefix
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached == 8
    assert s.alloc.refcount(a.block_table[0]) == 2
    assert (s.prompt_tokens, s.cached_prompt_tokens) == (21, 8)
    s.finish(a, "cancelled")
    assert s.alloc.refcount(b.block_table[0]) == 1 and a.block_table == []


def test_rows_of_a_sequence_cancelled_during_its_step_are_not_registered():
    s = _sched(8)
    a = _seq(0, list(range(10, 22)))
    s.add(a)
    batch = s.schedule()
    s.finish(a, "cancelled")                     # the engine's cancel, while the step runs
    _run(s, batch)
    assert s.alloc.num_cached == 0 and s.alloc.num_free == 8


def test_admission_counts_free_hit_blocks_against_the_pool():
    # 4 blocks of 4. A leaves its 2 full blocks cached and free; C holds 2 more. B hits
    # A's 2 blocks and needs 1 fresh: 3 free blocks are needed (the 2 hits leave the free
    # pool), only 2 are free, so B waits (counting only the fresh block would admit B and
    # then fail to allocate it).
    s = _sched(4)
    a = _seq(0, list(range(10, 18)) + [1], max_tokens=1)        # 9 tokens -> 3 blocks
    s.add(a)
    _run(s, s.schedule())                                      # prefill + 1 token: finished
    assert a.status is SeqStatus.FINISHED and s.alloc.num_cached == 2 and s.alloc.num_free == 4
    c = _seq(1, list(range(100, 107)), max_tokens=8)            # 2 blocks, unrelated (decodes in the 2nd)
    s.add(c)
    _run(s, s.schedule())
    b = _seq(2, list(range(10, 18)) + [2])                      # hits A's 2 blocks
    s.add(b)
    batch = s.schedule()
    assert b not in batch.seqs and b.status is SeqStatus.WAITING
    s.finish(c, "cancelled")
    batch = s.schedule()
    assert batch.seqs == [b] and b.num_cached == 8 and (batch.starts, batch.ends) == ([8], [9])


def test_caching_off_scheduler_never_shares():
    s = Scheduler(BlockAllocator(8, 4), max_batch=8, max_model_len=64, max_prefill_tokens=64)
    a = _seq(0, list(range(10, 20)))
    s.add(a)
    _run(s, s.schedule())
    b = _seq(1, list(range(10, 20)))
    s.add(b)
    batch = s.schedule()
    assert batch.starts[-1] == 0 and s.alloc.num_cached == 0 and s.stats()["cached_prompt_tokens"] == 0


# ------------------------------------------------------------------------- engine
@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, parity.build(request.param, path), path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-pc")
    return parity.build("llama", path, seed=3), path


def hits(eng):
    st = eng.stats()
    return st["prompt_tokens"], st["cached_prompt_tokens"]


def test_shared_prefix_matches_caching_off_and_transformers(model):
    name, hf, path = model
    system = [1] + toks(69, seed=1)                                  # 70 tokens: 4 full blocks + 6
    ps = [system + toks(5, seed=s) for s in (2, 3, 4)]              # 75 tokens each
    with Engine.from_pretrained(path, kv_cache_tokens=2048, max_prefill_tokens=32) as on, \
            Engine.from_pretrained(path, kv_cache_tokens=2048, max_prefill_tokens=32,
                                   enable_prefix_caching=False) as off:
        assert on.stats()["prefix_caching"] and not off.stats()["prefix_caching"]
        got = [on.generate([p], greedy(12))[0] for p in ps]         # one after another: 2nd and 3rd hit
        assert got == [off.generate([p], greedy(12))[0] for p in ps]
        assert got == [parity.hf_greedy(hf, p, 12) for p in ps]
        # the first computes everything; the others reuse the system prompt's 4 full blocks
        assert hits(on) == (3 * 75, 2 * 64)
        assert hits(off) == (3 * 75, 0) and off.stats()["cached_blocks"] == 0
        # a second turn re-sends the first turn's prompt and answer: those blocks hit too
        turn2 = ps[0] + got[0] + toks(3, seed=9)
        before = hits(on)
        out = on.generate([turn2], greedy(8))[0]
        assert out == parity.hf_greedy(hf, turn2, 8)
        # turn 1 cached its prompt and all but its last token (never fed back): full blocks
        # of that, up to the block before turn 2's last token; past 64, i.e. answer blocks too
        cached = min((75 + len(got[0]) - 1) // BS, (len(turn2) - 1) // BS) * BS
        assert cached > 64                                             # the answer's blocks hit too
        assert (hits(on)[0] - before[0], hits(on)[1] - before[1]) == (len(turn2), cached)


@pytest.mark.parametrize("n", [32, 33, 40])
def test_whole_prompt_hit_recomputes_only_what_the_last_token_needs(llama, n):
    # A hit never covers the last prompt token (its logits are needed): (n - 1) // 16 blocks.
    # n = 33: only the last token is computed; n = 32: the last token lives in the second
    # full block, which is then recomputed whole; n = 40: the partial block's 8 tokens.
    hf, path = llama
    p = [1] + toks(n - 1, seed=n)
    with Engine.from_pretrained(path, kv_cache_tokens=1024) as on:
        first = on.generate([p], greedy(6))[0]
        assert hits(on) == (n, 0)
        again = on.generate([p], greedy(6))[0]
        cached = (n - 1) // BS * BS
        assert hits(on) == (2 * n, cached)
        assert n - cached == {32: 16, 33: 1, 40: 8}[n]
    assert first == again == parity.hf_greedy(hf, p, 6)


def test_staggered_requests_sharing_a_prefix_match_solo(llama):
    # hits land in mixed steps (prefill chunks starting after a cached prefix beside decode rows)
    hf, path = llama
    system = [1] + toks(47, seed=5)
    ps = [system + toks(3 + i, seed=20 + i) for i in range(6)]
    params = greedy(16, ignore_eos=True)
    with Engine.from_pretrained(path, kv_cache_tokens=2048, max_prefill_tokens=16,
                                enable_prefix_caching=False) as off:
        solo = [off.generate([p], params)[0] for p in ps]
    with Engine.from_pretrained(path, kv_cache_tokens=2048, max_prefill_tokens=16) as on:
        first = on.submit(ps[0], params)
        wait_until(lambda: len(first.output_ids) >= 2)              # its prompt is cached now
        rest = []
        for p in ps[1:]:
            rest.append(on.submit(p, params))
            time.sleep(0.003)
        outs = [h.result(timeout=60) for h in [first] + rest]
        st = on.stats()
        assert st["cached_prompt_tokens"] == 5 * 48 and st["mixed_steps"] >= 1   # 3 system blocks each
    assert outs == solo


def test_full_pool_of_cached_blocks_still_admits_and_evicted_blocks_never_match(llama):
    hf, path = llama
    a = [1] + toks(39, seed=7)                  # 40 tokens + 8 new: 3 blocks, 2 of them full
    b = [1] + toks(39, seed=8)                  # unrelated, same size
    with Engine.from_pretrained(path, kv_cache_tokens=64) as eng:   # 4 blocks
        want_a = eng.generate([a], greedy(8))[0]
        st = eng.stats()
        assert (st["cached_blocks"], st["free_blocks"], st["total_blocks"]) == (2, 4, 4)  # cached = still free
        want_b = eng.generate([b], greedy(8))[0]  # 2 empty blocks + evicts A's 2nd (least recent: tail first)
        st = eng.stats()
        assert (st["cached_blocks"], st["free_blocks"]) == (3, 4) and eng.allocator.num_evicted == 1
        before = hits(eng)
        again = eng.generate([a], greedy(8))[0]
        assert hits(eng)[1] - before[1] == BS   # A's first block still cached, its evicted second not
    assert want_a == again == parity.hf_greedy(hf, a, 8)
    assert want_b == parity.hf_greedy(hf, b, 8)


def test_a_pool_full_of_cache_keeps_cpu_tables_consecutive(llama):
    # 12 blocks; each request: 40 prompt + 20 new -> 4 blocks (3 full, registered). From the
    # fourth request on, the pool holds only cached blocks and one empty block per earlier
    # request; block-by-block LRU eviction would give scattered tables (the CPU decode then
    # gathers), the window eviction gives consecutive ones, the growth block included.
    hf, path = llama
    ps = [[1] + toks(39, seed=50 + i) for i in range(7)]
    seen = []
    with Engine.from_pretrained(path, kv_cache_tokens=192) as eng:
        eng.step_hook = lambda: seen.extend(list(s.block_table) for s in eng.scheduler.running)
        outs = [eng.generate([p], greedy(20, ignore_eos=True))[0] for p in ps]
        assert eng.allocator.num_evicted > 0 and eng.stats()["cached_blocks"] > 0
    assert seen and all(t == list(range(t[0], t[0] + len(t))) for t in seen), seen
    with Engine.from_pretrained(path, kv_cache_tokens=2048, enable_prefix_caching=False) as off:
        assert outs == [off.generate([p], greedy(20, ignore_eos=True))[0] for p in ps]


def test_preemption_with_shared_prefixes_matches_a_big_pool(llama):
    # 6 blocks. Each request: 40-token prompt (36 shared: 2 full blocks), 40 new -> up to 5
    # blocks; three of them need 2 shared + 3 x 3 private = 11 blocks: preemption certain.
    hf, path = llama
    system = [1] + toks(35, seed=11)
    ps = [system + toks(4, seed=30 + i) for i in range(3)]
    params = greedy(40, ignore_eos=True)
    with Engine.from_pretrained(path, kv_cache_tokens=2048, enable_prefix_caching=False) as big:
        want = [big.generate([p], params)[0] for p in ps]
    with Engine.from_pretrained(path, kv_cache_tokens=96) as eng:
        first = eng.submit(ps[0], params)
        wait_until(lambda: len(first.output_ids) >= 1)
        handles = [first] + [eng.submit(p, params) for p in ps[1:]]
        outs = [h.result(timeout=60) for h in handles]
        st = eng.stats()
        assert st["preemptions"] >= 1 and st["cached_prompt_tokens"] >= 2 * 32
        assert st["free_blocks"] == st["total_blocks"] and st["running"] == 0
    assert outs == want


def _steps_hook(eng, on_step):
    """step_hook calling on_step(n) before the n-th forward (1-based)."""
    n = [0]

    def hook():
        n[0] += 1
        on_step(n[0])

    eng.step_hook = hook


def test_cancel_mid_prefill_registers_no_partial_or_unfinished_block(llama):
    hf, path = llama
    p = [1] + toks(63, seed=13)                  # 64 tokens in chunks of 24: [0,24) [24,48) [48,64)
    with Engine.from_pretrained(path, kv_cache_tokens=512, max_prefill_tokens=24) as eng:
        box = []

        def on_step(n):
            if n == 2:                           # while the 2nd chunk runs
                box[0].cancel()

        _steps_hook(eng, on_step)
        box.append(eng.submit(p, greedy(4)))
        box[0].wait(30)
        assert box[0].finish_reason == "cancelled"
        wait_until(lambda: not eng._in_step)
        # step 1 filled block 0 (registered) and half of block 1 (partial: not); step 2's
        # blocks 1-2 were computed for a cancelled request: not registered either
        st = eng.stats()
        assert st["cached_blocks"] == 1 and st["free_blocks"] == st["total_blocks"]
        eng.step_hook = None
        before = hits(eng)
        out = eng.generate([p], greedy(4))[0]
        assert hits(eng)[1] - before[1] == BS
    assert out == parity.hf_greedy(hf, p, 4)


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("at_step", [1, 3])    # a prefill step, a decode step
def test_a_cancel_while_a_step_builds_its_inputs_fails_nobody_else(llama, caching, at_step):
    """`step_hook` runs after schedule() released the lock and before the runner reads the
    batch: exactly where a client's cancel can land. The runner reads the batch's snapshot
    of block tables and positions, not the released sequence (review finding: the other
    requests of that step failed with an IndexError)."""
    hf, path = llama
    a, b = [1] + toks(40, seed=21), [1] + toks(30, seed=22)
    with Engine.from_pretrained(path, kv_cache_tokens=512, enable_prefix_caching=caching) as eng:
        box = []

        def on_step(n):
            if n == at_step:
                box[0].cancel()

        _steps_hook(eng, on_step)
        box += [eng.submit(a, greedy(6)), eng.submit(b, greedy(6))]
        for h in box:
            h.wait(30)
        assert box[0].finish_reason == "cancelled"
        assert box[1].error is None and box[1].finish_reason == "length"
        assert box[1].output_ids == parity.hf_greedy(hf, b, 6)
        wait_until(lambda: not eng._in_step)
        st = eng.stats()
        assert st["free_blocks"] == st["total_blocks"]


def test_failed_step_and_nan_logits_register_nothing(llama):
    hf, path = llama
    p = [1] + toks(63, seed=14)
    with Engine.from_pretrained(path, kv_cache_tokens=512, max_prefill_tokens=24) as eng:
        def on_step(n):
            if n == 2:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")

        _steps_hook(eng, on_step)
        h = eng.submit(p, greedy(4))
        h.wait(30)
        assert h.finish_reason == "error" and isinstance(h.error, torch.OutOfMemoryError)
        assert eng.stats()["cached_blocks"] == 1           # step 1's full block only
        eng.step_hook = None
        # the failed request's cached block still serves, and correctly
        before = hits(eng)
        assert eng.generate([p], greedy(4))[0] == parity.hf_greedy(hf, p, 4)
        assert hits(eng)[1] - before[1] == BS
    q = [1] + toks(40, seed=15)                              # one step computes 2 full blocks and samples
    with Engine.from_pretrained(path, kv_cache_tokens=512) as eng:
        def poison(logits):
            logits[0] = float("nan")

        eng.logits_hook = poison
        h = eng.submit(q, greedy(4))
        h.wait(30)
        assert h.finish_reason == "error" and isinstance(h.error, FloatingPointError)
        assert eng.stats()["cached_blocks"] == 0
        eng.logits_hook = None
        assert eng.generate([q], greedy(4))[0] == parity.hf_greedy(hf, q, 4)
        assert eng.stats()["cached_prompt_tokens"] == 0 and eng.stats()["cached_blocks"] == 2


def test_park_and_unpark_clear_the_cache(llama):
    hf, path = llama
    p = [1] + toks(40, seed=16)
    with Engine.from_pretrained(path, kv_cache_tokens=512) as eng:
        want = eng.generate([p], greedy(6))[0]
        assert eng.stats()["cached_blocks"] == 2
        eng.park()
        assert eng.stats()["cached_blocks"] == 0 and eng.allocator.num_free == eng.allocator.num_blocks
        eng.unpark()
        before = hits(eng)
        assert eng.generate([p], greedy(6))[0] == want          # recomputed on the fresh pool
        assert hits(eng)[1] == before[1]                         # no hit on dropped K/V
        assert eng.generate([p], greedy(6))[0] == want           # and caching works again after
        assert hits(eng)[1] == before[1] + 2 * BS
    assert want == parity.hf_greedy(hf, p, 6)


def test_off_switch_argument_and_serving_json(llama, tmp_path):
    import hashlib
    import json
    import shutil

    _, path = llama
    p = [1] + toks(40, seed=17)

    def bundle(name, serving):
        root = tmp_path / name
        (root / "model").mkdir(parents=True)
        files = {}
        for f in Path(path).iterdir():
            shutil.copy(f, root / "model" / f.name)
            files[f"model/{f.name}"] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                        "size": f.stat().st_size}
        (root / "serving.json").write_text(json.dumps(serving))
        (root / "manifest.json").write_text(json.dumps({"name": "t", "version": 1, "files": files}))
        return root

    with Engine.from_pretrained(path, enable_prefix_caching=False) as eng:
        outs = [eng.generate([p], greedy(4))[0] for _ in range(3)]
        st = eng.stats()
        assert outs[0] == outs[1] == outs[2]
        assert not st["prefix_caching"] and st["cached_prompt_tokens"] == 0 and st["cached_blocks"] == 0
        assert st["prompt_tokens"] == 3 * len(p)
    off = bundle("off", {"kv_cache_tokens": 256, "enable_prefix_caching": False})
    with Engine.from_pretrained(off) as eng:
        eng.generate([p], greedy(2))
        eng.generate([p], greedy(2))
        assert not eng.stats()["prefix_caching"] and eng.stats()["cached_blocks"] == 0
    with Engine.from_pretrained(off, enable_prefix_caching=True) as eng:   # the argument wins
        assert eng.stats()["prefix_caching"]
    with Engine.from_pretrained(bundle("default", {"kv_cache_tokens": 256})) as eng:
        assert eng.stats()["prefix_caching"]                                # on by default
    with pytest.raises(ValueError, match="enable_prefix_caching .*true or false, got 'yes'"):
        Engine.from_pretrained(bundle("bad", {"enable_prefix_caching": "yes"}))
    with pytest.raises(ValueError, match="true or false, got 1"):
        Engine.from_pretrained(path, enable_prefix_caching=1)
    # publish-time check, like the other serving.json keys
    assert normalize_serving({"enable_prefix_caching": False}, {})["enable_prefix_caching"] is False
    assert "enable_prefix_caching" not in normalize_serving({}, {})        # absent: the engine's default
    with pytest.raises(BundleError, match="enable_prefix_caching must be true or false, got 0"):
        normalize_serving({"enable_prefix_caching": 0}, {})


def test_transformers_fallback_is_unaffected(llama):
    hf, path = llama
    system = [1] + toks(40, seed=18)
    ps = [system + [5, 6], system + [7, 8, 9]]
    with Engine.from_pretrained(path, model_impl="transformers", kv_cache_tokens=512) as eng:
        assert eng.path == "transformers"
        outs = [eng.generate([p], greedy(6))[0] for p in ps]
        st = eng.stats()
        assert not st["prefix_caching"] and st["cached_prompt_tokens"] == 0 and st["cached_blocks"] == 0
        assert not eng.runner._caches
    assert outs == [parity.hf_greedy(hf, p, 6) for p in ps]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_and_triton_decode_with_shared_blocks(llama):
    # decode rows replay CUDA graphs over block tables that point into shared blocks
    hf, path = llama
    system = [1] + toks(69, seed=19)
    ps = [system + toks(4, seed=40 + i) for i in range(4)]
    kw = dict(device="cuda", dtype="float32", max_batch=8, kv_cache_tokens=2048)
    with Engine.from_pretrained(path, enable_prefix_caching=False, **kw) as off:
        want = [off.generate([p], greedy(16))[0] for p in ps]
    with Engine.from_pretrained(path, **kw) as on:
        assert on.runner.graphs is not None
        first = on.generate([ps[0]], greedy(16))[0]
        rest = on.generate(ps[1:], greedy(16))                      # three hits decoding together
        assert hits(on)[1] == 3 * 64
    assert [first] + rest == want


@pytest.mark.parametrize("max_model_len", [64, 65])
def test_cpu_growth_room_stops_at_the_last_token_ever_stored(llama, max_model_len):
    """With cache in the pool, a CPU sequence is given room for its output up front; at most
    max_model_len - 1 tokens are ever stored (the last sampled one never is), so no room
    block beyond them (review finding: 65 got 5 blocks of 16 for 64 tokens)."""
    hf, path = llama
    with Engine.from_pretrained(path, kv_cache_tokens=1024, max_model_len=max_model_len) as eng:
        eng.generate([[1] + [9] * 20], greedy(2))     # leaves a cached free block: room is handed out
        h = eng.submit([1, 5, 6, 7], greedy(500))
        wait_until(lambda: h.output_ids or h.done)
        with eng._cond:
            held = len(h._seq.block_table)
        h.result()
        assert held == -(-(max_model_len - 1) // BS)
        assert len(h.output_ids) == max_model_len - 4 and h.finish_reason == "length"
