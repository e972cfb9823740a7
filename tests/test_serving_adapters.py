"""Adapter versions over the whole HTTP surface in one process (no Ray): app + replica +
controller + slot manager + real engines. Live and candidate are two LoRA versions of one
base: the candidate loads onto live's engine, both answer through the API with their own
adapter, admin state shows the shared engine, promote/rollback stay swaps."""

from __future__ import annotations

import asyncio

import httpx

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import build_demo_adapter, build_demo_model
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

TOKEN = "test-token-123"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_two_adapter_versions_serve_from_one_engine(tmp_path):
    store = Store(tmp_path / "store")
    model = build_demo_model("llama", 0, tmp_path / "base")
    store.publish(model, "base")
    for i in (1, 2):
        store.publish(build_demo_adapter(model, tmp_path / f"a{i}", seed=i, std=0.3), "bot", base="base:1")

    async def go():
        ctl = SlotController(str(store.root), app="local", bundle="bot:1")
        rep = Replica(Settings(store=str(store.root), app="local", admin_token_sha256=digest(TOKEN)),
                      LocalController(ctl), replica_id="r1")
        await rep.start()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://test",
                              timeout=60)
        ask = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "temperature": 0}
        try:
            r = await c.post("/admin/load", json={"bundle": "bot:2"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["converged"], r.text
            live, cand = rep.mgr.slot("live"), rep.mgr.slot("candidate")
            assert cand.engine is live.engine
            state = (await c.get("/admin/state", headers=AUTH)).json()
            slots = state["replicas"][0]["slots"]["slots"]
            assert slots["candidate"]["engine_shared_with"] == ["live"] and slots["candidate"]["kv_bytes"] == 0
            assert slots["candidate"]["adapter_of"] == "base:1"
            one, two = await asyncio.gather(c.post("/v1/chat/completions", json={"model": "bot:1", **ask}),
                                            c.post("/v1/chat/completions", json={"model": "bot:2", **ask}))
            assert one.json()["model"] == "bot:1" and two.json()["model"] == "bot:2", (one.text, two.text)
            t1, t2 = (x.json()["choices"][0]["message"]["content"] for x in (one, two))
            assert t1 != t2                    # each answered with its own adapter
            r = await c.post("/admin/rollout/promote", json={"reason": "test"}, headers=AUTH)
            assert r.status_code == 200, r.text
            again = await c.post("/v1/chat/completions", json={"model": "bot", **ask})
            assert again.json()["model"] == "bot:2" and again.json()["choices"][0]["message"]["content"] == t2
            r = await c.post("/admin/rollback", json={"reason": "drill"}, headers=AUTH)
            assert r.status_code == 200, r.text
            back = await c.post("/v1/chat/completions", json={"model": "bot", **ask})
            assert back.json()["model"] == "bot:1" and back.json()["choices"][0]["message"]["content"] == t1
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())
