"""Rollback to a parked previous while a candidate load holds the memory lock.

The load is made slow the way a slow disk would: every weight tensor read by a loader
thread sleeps. Before the fix, the replica's rollback called the synchronous
SlotManager.rollback on its event loop; bringing previous back waits for the memory
lock the load holds, so the loop — every request of the replica — stalled until the
load ended. Now the copy-back runs off the loop and aborts the candidate load.

Bundles: demo:1 (seed 0), demo:2 (seed 1), demo:3 (seed 2): greedy answers differ, so
an answer proves which engine gave it. Previous is parked explicitly (on a GPU a load
that does not fit beside it parks it; on CPU the budget arithmetic would be contrived).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.engine import SamplingParams
from slotserve.replica import LocalController, Replica, Settings
from slotserve.slots import LoadAborted, SlotManager

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 6, 7]
READ_S = 0.3            # per weight tensor: ~15 tensors, so a load takes ~4.5 s


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    st = Store(root)
    for seed in (0, 1, 2):
        publish_demo(st, "demo", seed=seed)
    return st


class SlowReads:
    """While `on`, loads (loader threads only) read each weight tensor slowly; unparks do not."""

    def __init__(self):
        self.entered = threading.Event()      # a load is reading weights: it holds the memory lock
        self.on = False                       # set by a test just before the load to slow down

    def wrap(self, real):
        def acquire(pool, key, owner, make):
            if self.on and threading.current_thread().name == "slotserve-loader":
                self.entered.set()
                time.sleep(READ_S)
            return real(pool, key, owner, make)
        return acquire


@pytest.fixture
def slow_reads(monkeypatch):
    from slotserve.engine.weights import TensorPool

    slow = SlowReads()
    monkeypatch.setattr(TensorPool, "acquire", slow.wrap(TensorPool.acquire))
    return slow


async def _answer(mgr, slot="live"):
    return await (await mgr.generate(slot, PROMPT, GREEDY)).result()


def test_replica_rollback_to_parked_previous_during_a_load(store, slow_reads):
    """The event loop keeps turning, the rollback wins in well under the load's time, and
    the aborted load is neither waited for nor reported as a failed load."""

    async def go():
        ctl = SlotController(str(store.root), app="rbload", bundle="demo:1")
        mgr = SlotManager(store, memory_budget_bytes=1 << 30)
        rep = Replica(Settings(store=str(store.root), app="rbload", report_interval_s=0.05),
                      LocalController(ctl), mgr=mgr, replica_id="r1")
        await rep.start()
        try:
            demo1 = await _answer(mgr)
            assert "error" not in await ctl.admin("load", {"ref": "demo:2", "actor": "t"}, 60)
            assert "error" not in await ctl.admin("promote", {"actor": "t"}, 60)
            assert mgr.park("previous") > 0                  # previous demo:1 now in host memory
            slow_reads.on = True

            loading = asyncio.create_task(ctl.admin("load", {"ref": "demo:3", "actor": "t"}, 60))
            while not slow_reads.entered.is_set():                   # the load holds the memory lock now
                await asyncio.sleep(0.01)

            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker():                              # how long the loop stays blocked
                last = time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            r = await ctl.admin("rollback", {"actor": "t", "reason": "drill during a load"}, 30)
            took = time.perf_counter() - t0
            during = await _answer(mgr)                      # live traffic right after it
            stop.set()
            await tick
            assert "error" not in r and r["converged"], r
            assert max(gaps) < 1.0, f"event loop blocked {max(gaps):.2f}s"
            assert took < 2.0, f"rollback took {took:.2f}s (a load takes ~{15 * READ_S:.1f}s)"
            st = mgr.state()
            assert st["live"].ref == "demo:1" and st["live"].tier == "device"
            assert st["previous"].ref == "demo:2"
            assert during == demo1

            # The aborted load is not a failure of demo:3: nothing reports it as one. The
            # replica then holds what the desired state says (the controller releases a
            # staged candidate on rollback; were it kept, the replica would load it again).
            done = await loading           # the load's caller learns it was superseded, not "converged"
            assert done["error"]["status"] == 409 and done["error"]["code"] == "superseded", done
            want = ctl.core.state
            st = mgr.state()
            assert {n: i.ref for n, i in st.slots.items()} == {
                n: ref.ref for n in ("live", "previous", "candidate") if (ref := want.slot(n))}
            assert st["live"].ref == "demo:1" and st["previous"].ref == "demo:2"
            assert rep.error is None and rep.applied == want.version
        finally:
            await rep.stop()
            mgr.close()

    asyncio.run(go())


def test_manager_rollback_aborts_the_candidate_load(store, slow_reads):
    """SlotManager.rollback (sync) aborts a candidate load instead of waiting for it; the
    aborted load leaves nothing behind, and a later load of it works."""
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        mgr.load("demo:1", "live")
        demo1 = asyncio.run(_answer(mgr))
        mgr.load("demo:2")
        mgr.promote()                                        # live demo:2, previous demo:1
        mgr.park("previous")
        slow_reads.on = True
        box: dict = {}

        def load():
            try:
                mgr.load("demo:3")
            except BaseException as exc:  # handed to the test below
                box["error"] = exc

        th = threading.Thread(target=load)
        th.start()
        assert slow_reads.entered.wait(10)
        t0 = time.perf_counter()
        sw = mgr.rollback("emergency")
        took = time.perf_counter() - t0
        th.join(10)
        assert not th.is_alive()
        assert sw.live == "demo:1" and took < 2.0, took
        assert isinstance(box.get("error"), LoadAborted) and "rollback" in str(box["error"])
        st = mgr.state()
        assert st["live"].tier == "device" and st["previous"].ref == "demo:2" and "candidate" not in st
        owners = {mgr.slot("live").engine._owner, mgr.slot("previous").engine._owner}
        assert all(holders <= owners for _, holders in mgr.pool._entries.values())  # no leftover claims
        assert asyncio.run(_answer(mgr)) == demo1
        slow_reads.on = False
        assert mgr.load("demo:3").ref == "demo:3"            # the abort is not sticky
    finally:
        mgr.close()


def test_rollback_to_warm_previous_leaves_the_load_alone(store, slow_reads):
    """Previous on the device: rollback_async is a pointer swap on the loop and the
    candidate load carries on."""
    mgr = SlotManager(store, memory_budget_bytes=1 << 30)
    try:
        mgr.load("demo:1", "live")
        mgr.load("demo:2")
        mgr.promote()
        slow_reads.on = True
        th = threading.Thread(target=mgr.load, args=("demo:3",))
        th.start()
        assert slow_reads.entered.wait(10)

        async def swap():
            t0 = time.perf_counter()
            sw = await mgr.rollback_async("warm")
            return sw, time.perf_counter() - t0

        sw, took = asyncio.run(swap())
        slow_reads.on = False                                # let the load finish quickly
        assert sw.live == "demo:1" and took < 0.2, took
        th.join(30)
        assert mgr.slot("candidate").ref == "demo:3"
    finally:
        mgr.close()
