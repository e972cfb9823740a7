"""Slots and memory: refusal with numbers while live serves, eviction, dedup in bytes,
KV caches never shared across digests."""

import asyncio

import pytest

from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.store import Store
from slotserve.engine import SamplingParams
from slotserve.slots import MemoryPlanError
from slotserve.slots import SlotManager

GREEDY = SamplingParams(temperature=0, max_tokens=8)
MiB = 1 << 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    st = Store(root / "home")
    a, b = root / "seed0", root / "seed1"
    build_demo_model("llama", 0, a)
    build_demo_model("llama", 1, b)
    st.publish(a, "demo")                                             # demo:1
    (root / "prompt.jinja").write_text("{{ messages[-1].content }}")
    st.publish(a, "demo", prompt_template=root / "prompt.jinja",      # demo:2: same weights,
               serving={"max_batch": 8, "kv_cache_tokens": 1024})     # other prompt + serving
    st.publish(b, "demo")                                             # demo:3: other weights
    return st


async def _gen(mgr, slot="live"):
    return await (await mgr.generate(slot, [1, 2, 3], GREEDY)).result()


def test_candidate_that_does_not_fit_is_refused_and_live_serves(store):
    # live holds ~2.5 MiB (0.53 MiB weights + 2 MiB KV); no headroom to keep numbers exact
    mgr = SlotManager(store, memory_budget_bytes=4 * MiB, headroom_bytes=0)
    try:
        mgr.load("demo:1", "live")
        before = asyncio.run(_gen(mgr))
        held = mgr.state()["live"].held_bytes
        with pytest.raises(MemoryPlanError) as ei:
            mgr.load("demo:3")
        e = ei.value
        assert e.free == 4 * MiB - held and e.needed > e.free and e.held == {"live": held}
        msg = str(e)
        assert f"{e.needed} B" in msg and f"{e.free} B" in msg and "live=" in msg
        assert "candidate" not in mgr.state()
        assert asyncio.run(_gen(mgr)) == before          # live kept serving, untouched
        # Same weights (only prompt/serving differ) cost just their KV pool: it fits.
        cand = mgr.load("demo:2")
        info = mgr.state()["candidate"]
        assert info.held_weight_bytes == 0 and info.shared_bytes == info.weight_bytes > 0
        assert info.kv_bytes == cand.engine.memory().kv_bytes == 1024 * 2 * 2 * 2 * 16 * 4
    finally:
        mgr.close()


def test_evict_previous_makes_room_explicitly(store):
    mgr = SlotManager(store, memory_budget_bytes=6 * MiB, headroom_bytes=0)
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:3")
        mgr.promote()                                    # live demo:3, previous demo:1
        with pytest.raises(MemoryPlanError, match="previous="):
            mgr.load("demo:1")                           # a third copy does not fit...
        mgr.load("demo:1", evict_previous=True)          # ...unless previous is dropped
        st = mgr.state()
        assert "previous" not in st and st["candidate"].ref == "demo:1"
    finally:
        mgr.close()


def test_dedup_bytes_and_holder_moves_when_released(store):
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:2")
        st = mgr.state()
        live, cand = st["live"], st["candidate"]
        assert live.weight_bytes == cand.weight_bytes
        assert live.shared_bytes == 0 and live.held_weight_bytes == live.weight_bytes
        assert cand.held_weight_bytes == 0 and cand.shared_bytes == cand.weight_bytes
        # one copy of the weights in memory: identical storages in both engines
        w1 = {t.untyped_storage().data_ptr() for t in mgr.slot("live").engine.runner.weights()}
        w2 = {t.untyped_storage().data_ptr() for t in mgr.slot("candidate").engine.runner.weights()}
        assert w1 == w2
        # byte-identical tokenizer files: one tokenizer object serves both
        assert mgr.slot("candidate").tokenizer is mgr.slot("live").tokenizer is not None
        mgr.release("live")
        cand = mgr.state()["candidate"]
        assert cand.shared_bytes == 0 and cand.held_weight_bytes == cand.weight_bytes
        mgr.load("demo:3", "live")                       # different weights: nothing shared
        assert mgr.state()["live"].shared_bytes == 0
    finally:
        mgr.close()


def test_kv_caches_are_per_digest(store):
    """Two versions with identical weights share weights but never KV: nothing cached by
    one version is served by another."""
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        a, b = mgr.load("demo:1", "live"), mgr.load("demo:2")
        assert a.digest != b.digest and a.engine is not b.engine
        assert a.engine.kv._k.data_ptr() != b.engine.kv._k.data_ptr()
        assert a.engine.allocator is not b.engine.allocator
        free_b = b.engine.allocator.num_free
        req_a = asyncio.run(_gen(mgr, "live"))
        assert b.engine.allocator.num_free == free_b     # a's request touched only a's pool
        assert b.engine.stats()["submitted"] == 0
        assert asyncio.run(_gen(mgr, "candidate")) == req_a   # same weights, own cache
        assert a.engine.stats()["submitted"] == 1 and b.engine.stats()["submitted"] == 1
        # state says so too: KV bytes are never reported as shared
        st = mgr.state()
        assert st["candidate"].shared_bytes == st["candidate"].weight_bytes
        assert st["candidate"].held_bytes == st["candidate"].kv_bytes
    finally:
        mgr.close()
