"""Readiness (GET /healthz) says "can answer a request now" (issue 14 #3): 200 while live
serves, also during a candidate load and after a rollback that interrupted one, with the
current desired version in the body. App + replica + in-process controller, real
engines; loads are slowed the way a slow disk would (every weight tensor read sleeps)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

READ_S = 0.25


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(tmp_path_factory.mktemp("health-store"))
    for seed in (0, 1, 2):
        publish_demo(st, "demo", seed=seed)
    return st


@pytest.fixture
def slow_loads(monkeypatch):
    from slotserve.engine.weights import TensorPool
    state = {"on": False, "entered": threading.Event()}
    real = TensorPool.acquire

    def acquire(pool, key, owner, make):
        if state["on"] and threading.current_thread().name == "slotserve-loader":
            state["entered"].set()
            time.sleep(READ_S)
        return real(pool, key, owner, make)

    monkeypatch.setattr(TensorPool, "acquire", acquire)
    return state


def test_healthz_is_ready_while_live_serves(store, slow_loads):
    async def go():
        ctl = SlotController(str(store.root), app="health", bundle="demo:1")
        rep = Replica(Settings(store=str(store.root), app="health", report_interval_s=0.05),
                      LocalController(ctl), replica_id="h1")
        await rep.start()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        try:
            r = await c.get("/healthz")
            assert r.status_code == 200 and r.json()["converged"] and r.json()["status"] == "ok"
            assert "error" not in await ctl.admin("load", {"ref": "demo:2", "actor": "t"}, 60)
            assert "error" not in await ctl.admin("promote", {"actor": "t"}, 60)

            slow_loads["on"] = True                          # a candidate load that takes seconds
            loading = asyncio.create_task(ctl.admin("load", {"ref": "demo:3", "actor": "t"}, 60))
            while not slow_loads["entered"].is_set():
                await asyncio.sleep(0.01)
            r = await c.get("/healthz")
            body = r.json()
            assert r.status_code == 200 and body["ready"], body
            assert body["desired_version"] == ctl.core.state.version and "demo:3" in body["loading"]

            rb = await ctl.admin("rollback", {"actor": "t", "reason": "during a load"}, 30)
            assert "error" not in rb, rb
            assert (await loading)["error"]["code"] == "superseded"
            assert rep.loading is not None                   # the replica's load (warm previous) goes on
            for _ in range(5):                               # the whole time it runs, not just once
                r = await c.get("/healthz")
                body = r.json()
                assert r.status_code == 200 and body["ready"], body
                assert body["desired_version"] == ctl.core.state.version == rb["version"], body
                assert body["slots"]["live"] == "demo:1"
                assert (await c.post("/v1/chat/completions", json=chat)).status_code == 200
                await asyncio.sleep(0.1)
            slow_loads["on"] = False
            for _ in range(400):
                body = (await c.get("/healthz")).json()
                if body["converged"]:
                    break
                await asyncio.sleep(0.05)
            assert body["converged"] and body["applied_version"] == body["desired_version"]
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()
            ctl.stop()

    asyncio.run(go())


def test_healthz_before_any_live_is_503():
    class NoController:
        async def call(self, *a, **k):
            raise RuntimeError("controller not reachable")

    rep = Replica(Settings(), NoController(), mgr=object.__new__(_Empty), replica_id="x")
    body = rep.health()
    assert body["ready"] is False and body["desired_version"] is None
    assert body["status"] == "waiting for the controller"


class _Empty:
    """A slot manager holding nothing (health only asks for slots)."""
    on_oom = None

    def get(self, name):
        return None
