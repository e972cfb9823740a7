"""Tiers: previous parked in host memory, reported as such, rolled back with one copy.

On CPU "host" and "device" are the same RAM, so a forced park clones the exclusive
tensors: the exact code path a GPU takes (there: pinned host memory), minus the DMA.
"""

import asyncio

import pytest

from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.store import Store
from slotserve.engine import SamplingParams
from slotserve.slots import SlotManager, SlotUnavailable

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    st = Store(root / "home")
    for seed in (0, 1):
        build_demo_model("llama", seed, root / f"s{seed}")
        st.publish(root / f"s{seed}", "demo")       # demo:1 seed 0, demo:2 seed 1
    st.publish(root / "s0", "demo", serving={"max_batch": 4})   # demo:3 = demo:1's weights
    return st


async def _gen(mgr, slot):
    return await (await mgr.generate(slot, PROMPT, GREEDY)).result()


def test_park_previous_rollback_unparks(store):
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:2")
        mgr.promote()                                   # live demo:2, previous demo:1
        old_answer = asyncio.run(_gen(mgr, "previous"))
        assert mgr.state()["previous"].tier == "device"  # CPU: trivially on the device
        prev = mgr.slot("previous")
        before = {id(t) for t in prev.engine.runner.weights()}
        moved = mgr.park("previous")
        st = mgr.state()["previous"]
        assert st.tier == "host" and moved == st.weight_bytes > 0
        assert st.kv_bytes == 0                          # an idle KV pool is dropped
        assert before.isdisjoint(id(t) for t in prev.engine.runner.weights())  # new copies
        with pytest.raises(SlotUnavailable, match="parked"):
            asyncio.run(_gen(mgr, "previous"))
        assert mgr.park("previous") == 0                 # idempotent
        sw = mgr.rollback("drill with a parked previous")
        st = mgr.state()
        assert sw.live == "demo:1" and st["live"].tier == "device" and st["live"].kv_bytes > 0
        assert asyncio.run(_gen(mgr, "live")) == old_answer   # weights survived the trip
    finally:
        mgr.close()


def test_park_keeps_tensors_shared_with_live(store):
    """Parking frees only what previous holds alone; shared weights stay put for live."""
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:3")
        mgr.promote()                                   # live demo:3, previous demo:1 (same weights)
        live_answer = asyncio.run(_gen(mgr, "live"))
        assert mgr.park("previous") == 0                # everything it uses is shared with live
        assert mgr.state()["previous"].tier == "host"
        assert asyncio.run(_gen(mgr, "live")) == live_answer
        mgr.rollback("back")
        assert asyncio.run(_gen(mgr, "live")) == live_answer
    finally:
        mgr.close()


def test_auto_park_when_candidate_does_not_fit(store):
    """park_when_full (default on CUDA): a load that fits only without previous on the
    device parks previous instead of refusing. Rolling back to it then needs room for
    the copy back, planned like a load: a rollback is never refused for want of room,
    the candidate (never live or previous) is released to make it."""
    mgr = SlotManager(store, memory_budget_bytes=7 << 20, headroom_bytes=0, park_when_full=True)
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:2")
        mgr.promote()                                   # live demo:2, previous demo:1: 5.1 MiB
        mgr.load("demo:3")                              # +2 MiB KV does not fit: previous parks
        st = mgr.state()
        assert st["previous"].tier == "host" and st["candidate"].tier == "device"
        assert mgr.rollback("no room to copy previous back unless the candidate goes").live == "demo:1"
        st = mgr.state()
        assert st["live"].ref == "demo:1" and st["live"].tier == "device"
        assert st["previous"].ref == "demo:2" and "candidate" not in st
    finally:
        mgr.close()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_park_to_pinned_host_and_back(store):
    """On a GPU parking really frees device memory (weights to pinned host, KV dropped),
    and a rollback copies them back with identical answers. Checked on an H100."""
    import torch

    mgr = SlotManager(store, device="cuda")
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:2")
        mgr.promote()                                   # previous demo:1 holds its own weights
        answer = asyncio.run(_gen(mgr, "previous"))
        before = torch.cuda.memory_allocated()
        moved = mgr.park("previous")
        prev = mgr.slot("previous")
        host = [t for t in prev.engine.runner.weights() if t.device.type == "cpu"]
        assert moved > 0 and host and all(t.is_pinned() for t in host)
        assert before - torch.cuda.memory_allocated() >= moved   # weights + KV left the GPU
        assert mgr.state()["previous"].tier == "host"
        mgr.rollback("gpu drill")
        assert mgr.state()["live"].tier == "device"
        assert asyncio.run(_gen(mgr, "live")) == answer
    finally:
        mgr.close()
