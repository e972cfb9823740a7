"""Overload is refused fast, with a Retry-After that reflects the queue (issue 14 #6):
the pure sizing, then the HTTP surface in one process (app + replica + controller + real
engines). Serve's own limit (slotserve.app.MAX_ONGOING_REQUESTS) is far above the
replica's, so on Ray too every request reaches this admission check."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from slotserve.api.handler import RETRY_AFTER_MAX_S, retry_after_s
from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings


def test_retry_after_reflects_the_queue():
    assert retry_after_s(1, 1, 0.2) == 1                 # never below 1 s
    assert retry_after_s(256, 256, 4.0) == 4             # one round of the running requests
    assert retry_after_s(512, 256, 4.0) == 8             # two rounds
    assert retry_after_s(10_000, 1, 30.0) == RETRY_AFTER_MAX_S
    assert retry_after_s(0, 0, 0.0) == 1


def test_serve_queues_nothing_before_our_check():
    from slotserve.app import MAX_ONGOING_REQUESTS, SlotServe
    assert MAX_ONGOING_REQUESTS >= 16 * Settings().max_inflight
    assert SlotServe._deployment_config.max_ongoing_requests == MAX_ONGOING_REQUESTS


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(tmp_path_factory.mktemp("overload-store"))
    publish_demo(st, "demo", seed=0)
    return st


def test_a_full_replica_answers_429_at_once(store):
    async def go():
        ctl = SlotController(str(store.root), app="overload", bundle="demo:1")
        rep = Replica(Settings(store=str(store.root), app="overload", max_inflight=2), LocalController(ctl),
                      replica_id="o1")
        await rep.start()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
        # 400 tokens with the demo's end-of-sequence ids banned: both stay in flight throughout
        long = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400,
                "logit_bias": {str(t): -100 for t in rep.mgr.slot("live").engine.eos_token_ids},
                "temperature": 1.0}
        try:
            running = [asyncio.create_task(c.post("/v1/chat/completions", json=long)) for _ in range(2)]
            deadline = time.perf_counter() + 60
            while rep.handler.inflight < 2:
                assert time.perf_counter() < deadline and not any(t.done() for t in running), \
                    [t.result().text for t in running if t.done()]
                await asyncio.sleep(0.005)
            rep.handler.latency_s = 7.5                      # as if requests took 7.5 s each
            took = []
            for i in range(20):
                t0 = time.perf_counter()
                body = long if i % 2 else b"{not json"       # refused before its body is even parsed
                r = await (c.post("/v1/chat/completions", json=body) if i % 2 else
                           c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))
                took.append(time.perf_counter() - t0)
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"] == "8" and r.json()["error"]["code"] == "overloaded"
            assert sorted(took)[len(took) // 2] < 0.1, took
            for t in running:
                assert (await t).status_code == 200
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()
            ctl.stop()

    asyncio.run(go())
