"""Adapter versions in slots: an adapter version whose base is resident joins the base's
engine — it costs the adapter's bytes (no second KV pool), its requests decode in the
same batches as live's, each row with its own adapter; promote/rollback stay pointer
swaps; releasing one slot leaves the other serving; the last slot closes the engine."""

import asyncio

import pytest

from slotserve.bundles.demo import build_demo_adapter, build_demo_model
from slotserve.bundles.store import Store
from slotserve.engine import Engine, SamplingParams
from slotserve.slots import SlotManager

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 7, 42, 99], [1, 5, 300, 301, 302, 17]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    st = Store(root / "home")
    model = build_demo_model("llama", 0, root / "base")
    st.publish(model, "base")                                                   # base:1
    st.publish(build_demo_adapter(model, root / "a1", seed=1, std=0.3), "bot", base="base:1")   # bot:1
    st.publish(build_demo_adapter(model, root / "a2", seed=2, rank=8, std=0.3), "bot", base="base:1")  # bot:2
    st.publish(build_demo_model("llama", 1, root / "other"), "other")            # other:1, another base
    return st


def alone(store, ref, prompts):
    """Each version's greedy output from an engine of its own."""
    rec = store.resolve(ref)
    with Engine.from_pretrained(store.path_of(rec.name, rec.version), kv_cache_tokens=1024) as eng:
        return eng.generate(prompts, GREEDY)


async def both(mgr, slots, prompts):
    reqs = [await mgr.generate(s, p, GREEDY) for s in slots for p in prompts]
    return [await r.result() for r in reqs]


def test_adapter_versions_share_one_base_engine(store):
    expect = {ref: alone(store, ref, PROMPTS) for ref in ("base:1", "bot:1", "bot:2")}
    assert len({tuple(map(tuple, v)) for v in expect.values()}) == 3   # three different behaviours
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        live = mgr.load("bot:1", "live")
        engine = live.engine
        steps0 = engine.stats()["steps"]
        cand = mgr.load("bot:2")
        assert cand.engine is engine                       # no second engine, no second KV pool
        st = mgr.state()
        assert st["candidate"].kv_bytes == 0 and st["live"].kv_bytes > 0
        adapter_bytes = engine.adapters.by_name["bot:2"].nbytes
        assert st["candidate"].held_bytes == adapter_bytes   # only the adapter's bytes
        assert st["candidate"].engine_shared_with == ("live",) and st["candidate"].adapter_of == "base:1"
        # live and candidate in flight together: same batches, each row its own adapter
        out = asyncio.run(both(mgr, ["live", "candidate"], PROMPTS))
        assert out == expect["bot:1"] + expect["bot:2"]
        s = engine.stats()
        assert s["steps"] - steps0 <= GREEDY.max_tokens + 2   # one pass per token for both versions
        # promote / rollback: pointer swaps on the same engine
        mgr.promote()
        assert mgr.slot("live") is cand and mgr.slot("previous") is live
        assert asyncio.run(both(mgr, ["live"], PROMPTS)) == expect["bot:2"]
        mgr.rollback("drill")
        assert asyncio.run(both(mgr, ["live", "previous"], PROMPTS)) == expect["bot:1"] + expect["bot:2"]
        # the plain base as a candidate (adapter vs its base) joins too
        mgr.release("previous")
        assert engine.adapters.names == ["bot:1"] and not engine.closed
        base = mgr.load("base:1")
        assert base.engine is engine and mgr.state()["candidate"].held_bytes == 0
        assert asyncio.run(both(mgr, ["candidate", "live"], PROMPTS)) == expect["base:1"] + expect["bot:1"]
        # a version of another base gets an engine of its own
        mgr.release("candidate")
        other = mgr.load("other:1")
        assert other.engine is not engine and mgr.state()["candidate"].engine_shared_with == ()
        mgr.release("candidate")
        mgr.release("live")
        assert engine.closed                               # the last slot closed the engine
    finally:
        mgr.close()


def test_a_drill_adapter_version_never_shares_live_engine(store, tmp_path):
    """Faults hook a whole engine: an adapter version declaring them gets an engine of its
    own, so live never sees them; so does one whose engine settings differ."""
    ad = build_demo_adapter(store.path_of("base", 1) / "model", tmp_path / "ad", seed=3, std=0.3)
    faulty = store.publish(ad, "bot", base="base:1", serving={"faults": {"nan_logits": True}})
    bigger = store.publish(ad, "bot", base="base:1", serving={"max_batch": 4})
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        live = mgr.load("bot:1", "live")
        for m in (faulty, bigger):
            cand = mgr.load(m.ref)
            assert cand.engine is not live.engine and mgr.state()["candidate"].kv_bytes > 0
            mgr.release("candidate")
        assert asyncio.run(both(mgr, ["live"], PROMPTS)) == alone(store, "bot:1", PROMPTS)
    finally:
        mgr.close()
