"""A replica that cannot load what the desired state asks (issue 14 #1, #2), driven with
an in-process controller and real slot managers (no Ray: the defect needs no server).

A replica "restarts" (a fresh SlotManager) while the previous bundle's weights are
corrupt: it keeps serving live, reports the failure, and a rollback is refused with 409
naming it before anything changes. Fixing the file is enough: the replica retries with
capped backoff and holds previous again, with no admin change; then the rollback works.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.engine import SamplingParams
from slotserve.replica import LocalController, Replica, Settings
from slotserve.replica.replica import RETRY_CAP_S, RETRY_FIRST_S, retry_delay
from slotserve.slots import SlotManager

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_retry_delay_doubles_and_is_capped():
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 4 * RETRY_FIRST_S]
    assert retry_delay(50) == RETRY_CAP_S == retry_delay(10_000)
    assert retry_delay(0) == RETRY_FIRST_S
    assert retry_delay(3, first=1.0, cap=3.0) == 3.0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(tmp_path_factory.mktemp("retry-store"))
    for seed in (0, 1):
        publish_demo(st, "demo", seed=seed)
    return st


def _flip_byte(path, at: int = 4096) -> bytes:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0xFF]))
    return old


def _restore_byte(path, old: bytes, at: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(old)


def test_a_replica_that_cannot_load_previous_keeps_serving_and_recovers_when_fixed(store):
    weights = store.path_of("demo", 1) / "model" / "model.safetensors"

    async def go():
        ctl = SlotController(str(store.root), app="retry", bundle="demo:1")
        settings = Settings(store=str(store.root), app="retry", report_interval_s=0.05)
        m1 = SlotManager(store, memory_budget_bytes=1 << 30)
        r1 = Replica(settings, LocalController(ctl), mgr=m1, replica_id="r1")
        await r1.start()
        m2 = None
        r2 = None
        old = None
        try:
            assert "error" not in await ctl.admin("load", {"ref": "demo:2", "actor": "t"}, 60)
            assert "error" not in await ctl.admin("promote", {"actor": "t"}, 60)
            old = _flip_byte(weights)                     # previous demo:1 is now corrupt on disk
            m2 = SlotManager(store, memory_budget_bytes=1 << 30)
            r2 = Replica(settings, LocalController(ctl), mgr=m2, replica_id="r2")   # a restarted replica
            await r2.start()
            assert m2.state()["live"].ref == "demo:2" and m2.get("previous") is None
            out = await (await m2.generate("live", [5, 6, 7], GREEDY)).result()   # live still answers
            assert len(out) == 4
            assert r2.error is not None and r2.error["retry_in_s"] > 0
            await asyncio.sleep(0.2)                      # its report reaches the controller
            v = ctl.core.state.version
            res = await ctl.admin("rollback", {"actor": "op", "reason": "drill"}, 10)
            assert res["error"]["status"] == 409 and res["error"]["code"] == "not_warm", res
            assert "r2" in res["error"]["message"] and "demo:1" in res["error"]["message"]
            assert ctl.core.state.version == v and ctl.core.state.live.ref == "demo:2"

            await asyncio.sleep(2 * RETRY_FIRST_S)
            assert r2._failures >= 2                      # it retries by itself, file still bad
            _restore_byte(weights, old)
            old = None
            deadline = time.monotonic() + 20
            # the slot fills first; the replica clears its error when the whole apply is done
            while (m2.get("previous") is None or r2.error is not None) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert m2.state()["previous"].ref == "demo:1", "the replica did not retry the load"
            assert r2.error is None and ctl.core.state.version == v     # no admin change was needed
            await asyncio.sleep(0.2)
            res = await ctl.admin("rollback", {"actor": "op", "reason": "drill"}, 10)
            assert "error" not in res and res["converged"], res
            assert m2.state()["live"].ref == "demo:1" == m1.state()["live"].ref
        finally:
            if old is not None:
                _restore_byte(weights, old)
            for r, m in ((r2, m2), (r1, m1)):
                if r is not None:
                    await r.stop()
                if m is not None:
                    m.close()
            ctl.stop()

    asyncio.run(go())
