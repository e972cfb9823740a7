"""Adapter versions and memory: the planner admits an adapter version beside its resident base
where a second full model does not fit; a drill version whose faults hook the whole engine
(NaN logits) gets an engine of its own, so live's rows are never touched; an adapter version
cannot enter a store that lacks its base."""

import asyncio

import pytest

from slotserve.bundles.demo import build_demo_adapter, build_demo_model
from slotserve.bundles.manifest import BundleError
from slotserve.bundles.store import Store
from slotserve.engine import SamplingParams
from slotserve.slots import MemoryPlanError, SlotManager

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 17, 42, 99, 3, 250, 77], [1, 5, 300, 301]]
MiB = 1 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter-memory")
    store = Store(tmp / "store")
    model = build_demo_model("llama", 0, tmp / "model")
    store.publish(model, "base", serving={"kv_cache_tokens": 1024})                       # base:1
    store.publish(build_demo_model("llama", 3, tmp / "other"), "other", serving={"kv_cache_tokens": 1024})
    ads = [build_demo_adapter(model, tmp / f"a{i}", seed=i, rank=8, std=0.3) for i in (1, 2)]
    store.publish(ads[0], "bot", base="base:1")                                           # bot:1
    store.publish(ads[1], "bot", base="base:1")                                           # bot:2
    store.publish(store.path_of("bot", 1), "bot", serving={"kv_cache_tokens": 1024,       # bot:3: NaN logits
                                                           "faults": {"nan_logits": True}})
    return store, tmp


async def _all(mgr, jobs):
    """Start every request before awaiting any (they share batches); errors come back as values."""
    reqs = [await mgr.generate(s, p, GREEDY) for s, p in jobs]
    return await asyncio.gather(*(r.result() for r in reqs), return_exceptions=True)


def test_planner_admits_an_adapter_version_where_a_second_model_does_not_fit(world):
    store, _ = world
    probe = SlotManager(store, memory_budget_bytes=64 * MiB, headroom_bytes=0)
    try:
        probe.load("base:1", "live")
        one = probe.state()["live"].held_bytes
    finally:
        probe.close()
    mgr = SlotManager(store, memory_budget_bytes=one + one // 4, headroom_bytes=0)   # one engine + a little
    try:
        mgr.load("base:1", "live")
        with pytest.raises(MemoryPlanError, match="does not fit"):
            mgr.load("other:1")                      # a second model (weights + KV pool) is refused
        assert "candidate" not in mgr.state()
        mgr.load("bot:1")                            # an adapter version: its LoRA tensors only
        mgr.promote()
        mgr.load("bot:2")
        st = mgr.state()
        assert set(st.slots) == {"live", "previous", "candidate"}
        assert sum(i.held_bytes for i in st.slots.values()) <= one + one // 4
        assert st["candidate"].kv_bytes == 0 and st["previous"].kv_bytes > 0
    finally:
        mgr.close()


def test_engine_wide_faults_never_reach_another_version(world):
    store, _ = world
    mgr = SlotManager(store, memory_budget_bytes=64 * MiB, headroom_bytes=0)
    try:
        live = mgr.load("bot:1", "live")
        alone = asyncio.run(_all(mgr, [("live", p) for p in PROMPTS]))
        cand = mgr.load("bot:3")
        assert cand.engine is not live.engine                # its NaN-logits hook is on its own engine
        assert mgr.state()["candidate"].engine_shared_with == ()
        both = asyncio.run(_all(mgr, [(s, p) for p in PROMPTS for s in ("live", "candidate")]))
        assert all(isinstance(r, FloatingPointError) for r in both[1::2])   # the drill's NaN logits ...
        assert both[0::2] == alone                           # ... never reach live's rows
    finally:
        mgr.close()


def test_an_adapter_version_needs_its_base_in_the_store(world, tmp_path):
    store, _ = world
    lone = Store(tmp_path / "lone")
    with pytest.raises(BundleError, match="not in the store"):
        lone.publish(store.path_of("bot", 1), "bot")        # the version without its base
    assert lone.list() == []
    b = lone.publish(store.path_of("base", 1), "base")      # that store's own base: another digest
    with pytest.raises(BundleError, match="with --base"):
        lone.publish(store.path_of("bot", 1), "bot")
    m = lone.publish(store.path_of("bot", 1) / "adapter", "bot", base="base:1")   # rebased on it
    assert m.adapter is not None and m.adapter.base == b.digest
