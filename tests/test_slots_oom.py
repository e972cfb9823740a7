"""OOM guard and faults through the slot manager: a candidate that runs out of memory is
released, reported and its request answered by live; live out of memory sheds load."""

import asyncio
import time

import pytest
import torch

from slotserve.bundles.demo import build_demo_model
from slotserve.bundles.store import Store
from slotserve.engine import SamplingParams
from slotserve.slots import MemoryPlanError
from slotserve.slots import Overloaded, SlotManager
from slotserve.slots.faults import InjectedError

GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    st = Store(root / "home")
    a, b = root / "seed0", root / "seed1"
    build_demo_model("llama", 0, a)
    build_demo_model("llama", 1, b)
    st.publish(a, "demo")                                               # demo:1 healthy
    st.publish(b, "demo", serving={"faults": {"oom_after": 2}})         # demo:2 OOMs from req 2
    st.publish(b, "demo", serving={"faults": {"oom_after": 0}})         # demo:3 OOMs at load
    st.publish(b, "demo", serving={"faults": {"error_rate": 1.0, "latency_ms": 50}})  # demo:4
    st.publish(b, "demo", serving={"faults": {"nan_logits": True}})     # demo:5
    st.publish(b, "demo")                                               # demo:6 healthy seed 1
    return st


def _mgr(store, events):
    mgr = SlotManager(store, memory_budget_bytes=1 << 30, on_oom=events.append)
    mgr.load("demo:1", "live")
    return mgr


async def _gen(mgr, slot):
    req = await mgr.generate(slot, PROMPT, GREEDY)
    return req, await req.result()


def test_injected_oom_in_candidate_is_reverted_and_retried_on_live(store):
    events = []
    mgr = _mgr(store, events)
    try:
        live_answer = asyncio.run(_gen(mgr, "live"))[1]
        mgr.load("demo:2")
        assert mgr.state()["candidate"].faults == {"oom_after": 2}
        req, out = asyncio.run(_gen(mgr, "candidate"))          # request 1: fine
        assert req.slot.name == "candidate" and out != live_answer
        req, out = asyncio.run(_gen(mgr, "candidate"))          # request 2: OOM -> live
        assert out == live_answer and req.retried and req.slot.name == "live"
        assert req.first_slot.ref == "demo:2"
        assert "candidate" not in mgr.state() and len(events) == 1
        ev = events[0]
        assert (ev.slot, ev.ref, ev.phase, ev.injected) == ("candidate", "demo:2", "request", True)
        assert ev.free_bytes > 0 and "live" in ev.held and ev.as_dict()["kind"] == "oom"
        _wait_closed(req.first_slot)                            # its engine was freed
    finally:
        mgr.close()


def test_real_oom_mid_engine_step_is_retried_on_live(store):
    """A torch.OutOfMemoryError raised inside the engine's step (not the injector)."""
    events = []
    mgr = _mgr(store, events)
    try:
        live_answer = asyncio.run(_gen(mgr, "live"))[1]
        cand = mgr.load("demo:6")

        def boom():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        cand.engine.step_hook = boom

        async def several():
            return await asyncio.gather(*(_gen(mgr, "candidate") for _ in range(4)))
        results = asyncio.run(several())
        assert all(out == live_answer and req.retried for req, out in results)
        assert len(events) == 1 and not events[0].injected   # one event, not one per request
        assert "candidate" not in mgr.state()
    finally:
        mgr.close()


def test_oom_on_live_sheds_load(store):
    events = []
    mgr = _mgr(store, events)
    try:
        def boom():
            raise torch.OutOfMemoryError("out of memory (simulated)")
        mgr.slot("live").engine.step_hook = boom
        with pytest.raises(Overloaded) as ei:
            asyncio.run(_gen(mgr, "live"))
        assert ei.value.retry_after_s == ei.value.retry_after == 1.0
        assert "live" in mgr.state() and not events                 # live is not dropped
        mgr.slot("live").engine.step_hook = None
        asyncio.run(_gen(mgr, "live"))                               # and recovers
    finally:
        mgr.close()


def test_oom_while_loading_candidate(store):
    events = []
    mgr = _mgr(store, events)
    try:
        with pytest.raises(MemoryPlanError, match="ran out of memory"):
            mgr.load("demo:3")
        assert "candidate" not in mgr.state()
        assert [(e.phase, e.slot, e.injected) for e in events] == [("load", "candidate", True)]
        mgr.load("demo:6")                                           # the slot is usable again
    finally:
        mgr.close()


def test_error_latency_and_nan_faults(store):
    mgr = _mgr(store, [])
    try:
        mgr.load("demo:4")
        t0 = time.perf_counter()
        with pytest.raises(InjectedError):
            asyncio.run(_gen(mgr, "candidate"))
        assert time.perf_counter() - t0 >= 0.05
        assert "candidate" in mgr.state()        # errors are the rollout's call, not ours
        mgr.release("candidate")
        mgr.load("demo:5")
        with pytest.raises(FloatingPointError, match="non-finite"):
            asyncio.run(_gen(mgr, "candidate"))
    finally:
        mgr.close()


def _wait_closed(slot, timeout=5.0):
    deadline = time.time() + timeout
    while not slot.engine.closed and time.time() < deadline:
        time.sleep(0.01)
    assert slot.engine.closed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_oom_loading_a_candidate_leaves_live_serving(store, tmp_path):
    """A real torch.OutOfMemoryError from the CUDA allocator (not the drill's): the caching
    allocator is capped at what live holds, and the candidate's 512 MiB KV pool needs new
    segments (a small candidate can fit in the cache's free fragments). The candidate is
    released, the event says it was real, live answers as before."""
    build_demo_model("llama", 1, tmp_path / "m")
    big = store.publish(tmp_path / "m", "demo", serving={"kv_cache_bytes": 512 << 20}).ref
    events = []
    mgr = SlotManager(store, device="cuda", memory_budget_bytes=8 << 30, on_oom=events.append)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        mgr.load("demo:1", "live")
        answer = asyncio.run(_gen(mgr, "live"))[1]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (1 << 16)) / total)
        try:
            with pytest.raises(MemoryPlanError, match="ran out of memory"):
                mgr.load(big)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        assert "candidate" not in mgr.state()
        assert [(e.phase, e.slot, e.injected) for e in events] == [("load", "candidate", False)]
        assert asyncio.run(_gen(mgr, "live"))[1] == answer
        mgr.load("demo:6")                                    # the slot is usable again
        assert "candidate" in mgr.state()
    finally:
        mgr.close()
