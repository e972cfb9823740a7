"""What an admin load answers when the desired state moves on while it waits for replicas
(the controller with a replica that reports by hand, no server)."""

import asyncio

import pytest

from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController


@pytest.fixture()
def root(tmp_path):
    s = Store(tmp_path)
    publish_demo(s, "demo", seed=0)
    publish_demo(s, "demo", seed=1)
    return str(tmp_path)


async def _started(root, app):
    ctl = SlotController(root, app=app, bundle="demo:1")
    await ctl.ping()
    v = ctl.core.state.version
    await ctl.report("r1", {"ready": True, "applied": v, "routed": v})
    return ctl


def test_a_load_promoted_while_it_waits_is_not_superseded(root):
    async def go():
        ctl = await _started(root, "promoted")
        loading = asyncio.create_task(ctl.admin("load", {"ref": "demo:2", "actor": "op"}, wait_s=5))
        await asyncio.sleep(0.1)
        await ctl.admin("promote", {"actor": "op2"}, wait_s=0.2)
        v = ctl.core.state.version
        await ctl.report("r1", {"ready": True, "applied": v, "routed": v})
        res = await loading
        assert "error" not in res and res["converged"], res
        assert ctl.core.state.live.ref == "demo:2"
    asyncio.run(go())


def test_a_rollback_while_a_load_waits_supersedes_it(root):
    async def go():
        publish_demo(Store(root), "demo", seed=2)                     # demo:3
        ctl = await _started(root, "rolledback")
        await ctl.admin("load", {"ref": "demo:2", "actor": "op"}, wait_s=0.1)
        await ctl.admin("promote", {"actor": "op"}, wait_s=0.1)    # live demo:2, previous demo:1
        loading = asyncio.create_task(ctl.admin("load", {"ref": "demo:3", "actor": "op"}, wait_s=5))
        await asyncio.sleep(0.1)
        assert ctl.core.state.candidate.ref == "demo:3"
        await ctl.admin("rollback", {"actor": "op2", "reason": "bad"}, wait_s=0.2)
        res = await loading
        assert res["error"]["status"] == 409 and res["error"]["code"] == "superseded", res
        assert "rollback to demo:1: bad" in res["error"]["message"], res
    asyncio.run(go())


def test_every_waiter_on_a_failed_load_hears_load_failed(root):
    async def go():
        ctl = await _started(root, "failed")
        a = asyncio.create_task(ctl.admin("load", {"ref": "demo:2", "actor": "op"}, wait_s=5))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(ctl.admin("load", {"ref": "demo:2", "actor": "op"}, wait_s=5))
        await asyncio.sleep(0.05)
        v = ctl.core.state.version
        await ctl.report("r1", {"ready": True, "applied": v - 1, "routed": v,
                                "error": {"version": v, "message": "does not fit: out of memory"}})
        for res in (await a, await b):
            assert res["error"]["code"] == "load_failed" and res["error"]["status"] == 507, res
    asyncio.run(go())
