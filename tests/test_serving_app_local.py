"""The whole HTTP surface in one process, no Ray: app + replica + controller + slot manager
+ real engines on the tiny demo bundles (httpx's ASGI transport instead of a socket)."""

from __future__ import annotations

import asyncio
import json
import httpx
import pytest

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

TOKEN = "test-token-123"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = Store(root)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    return root, store


async def _start(root, store):
    ctl = SlotController(str(root), app="local", bundle="demo:1")
    settings = Settings(store=str(root), app="local", admin_token_sha256=digest(TOKEN))
    rep = Replica(settings, LocalController(ctl), replica_id="r1")
    await rep.start()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)),
                               base_url="http://test", timeout=60)
    return ctl, rep, client


def test_end_to_end_local(env):
    root, store = env

    async def go():
        ctl, rep, c = await _start(root, store)
        try:
            r = await c.get("/healthz")
            assert r.status_code == 200 and r.json()["ready"], r.text
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "demo:1" and r.headers["x-slotserve-bundle"] == "demo:1"
            assert body["system_fingerprint"].startswith("sha256:")
            assert r.headers["x-slotserve-retrieval-index"] == "none"
            assert 0 < body["usage"]["completion_tokens"] <= 8

            r = await c.post("/v1/completions", json={"model": "demo", "prompt": "once upon",
                                                      "max_tokens": 5, "stream": True})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [e for e in r.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]"
            assert all(json.loads(e[6:])["model"] == "demo:1" for e in events[:-1])

            # admin: refused without the token
            assert (await c.get("/admin/state")).status_code == 401
            assert (await c.get("/admin/state", headers={"authorization": "Bearer nope"})).status_code == 401
            r = await c.post("/admin/load", json={"bundle": "demo:2"}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["converged"]
            r = await c.post("/v1/chat/completions", json={
                "model": "demo:2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.json()["model"] == "demo:2"  # pinned to the candidate
            r = await c.post("/admin/rollout/promote", json={"reason": "test"}, headers=AUTH)
            assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.json()["model"] == "demo:2"
            r = await c.post("/admin/rollback", json={"reason": "drill"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["converged"], r.text
            assert r.json()["converge_ms"] < 5000
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.json()["model"] == "demo:1"
            st = (await c.get("/admin/state", headers=AUTH)).json()
            assert st["desired"]["live"]["ref"] == "demo:1" and st["desired"]["previous"]["ref"] == "demo:2"
            led = (await c.get("/admin/ledger", headers=AUTH)).json()["entries"]
            assert {"rollback", "promote", "load"} <= {e["action"] for e in led}
            r = await c.get("/admin/ledger?limit=abc", headers=AUTH)
            assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text
            models = (await c.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["demo", "demo:1", "demo:2"]
            for m in models:   # what the openai client's models.retrieve(id) asks
                r = await c.get(f"/v1/models/{m['id']}")
                assert r.status_code == 200 and r.json() == m | {"created": r.json()["created"]}
            r = await c.get("/v1/models/demo:9")
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "demo:1" in r.json()["error"]["message"]
            # one bundle in two slots (previous and candidate) is still one model id
            r = await c.post("/admin/load", json={"bundle": "demo:2"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["converged"], r.text
            assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["demo", "demo:1", "demo:2"]
            # null means the default for the spec's nullable fields
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                "n": None, "stream": None})
            assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
            r = await c.post("/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2,
                                                      "echo": None, "stream": None})
            assert r.status_code == 200, r.text
            # usage says how much of the prompt the prefix cache served (as vLLM and OpenAI do)
            long = {"model": "demo:1", "max_tokens": 2, "temperature": 0,
                    "messages": [{"role": "user", "content": "the same long question " * 20}]}
            first = (await c.post("/v1/chat/completions", json=long)).json()["usage"]
            again = (await c.post("/v1/chat/completions", json=long)).json()["usage"]
            n = again["prompt_tokens"]
            assert first["prompt_tokens"] == n > 32
            # the first shares only the chat template's opening with earlier requests; the
            # repeat gets every whole block but the one holding its last token (computed anew)
            assert first["prompt_tokens_details"]["cached_tokens"] < n // 2
            assert again["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16, again
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())


BAD = [
    (b"{not json", 400),
    (b"", 400),
    (b"[1,2]", 400),
    (json.dumps({"model": "demo", "messages": []}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x " * 2000}]}).encode(), 400),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(), 404),
    (json.dumps({"model": "demo", "messages": "hello"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400),
    (json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "top_k": 2**31}).encode(), 400),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "\\udcff"}]}', 400),  # lone surrogate
]


def test_bad_input_is_a_4xx_openai_error(env):
    root, store = env

    async def go():
        ctl, rep, c = await _start(root, store)
        try:
            for raw, status in BAD:
                r = await c.post("/v1/chat/completions", content=raw,
                                 headers={"content-type": "application/json"})
                assert r.status_code == status, (raw[:80], r.status_code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
                assert "Traceback" not in r.text
            r = await c.get("/v1/nope")
            assert r.status_code == 404 and "error" in r.json()
            r = await c.post("/v1/feedback", json={"id": "x", "rating": "meh"})
            assert r.status_code == 400
            assert (await c.get("/healthz")).status_code == 200  # still healthy
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())


def test_overload_is_429_with_retry_after(env):
    root, store = env

    async def go():
        ctl = SlotController(str(root), app="local-429", bundle="demo:1")
        rep = Replica(Settings(store=str(root), app="local-429", max_inflight=1), LocalController(ctl),
                      replica_id="r429")
        await rep.start()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
        try:
            body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200,
                    "temperature": 1.0}
            first = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            for _ in range(200):
                if rep.handler.inflight:
                    break
                await asyncio.sleep(0.005)
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert (await first).status_code == 200
            r = await c.post("/v1/chat/completions", json={**body, "max_tokens": 2})
            assert r.status_code == 200  # capacity is back
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())


def test_failed_load_is_reported_and_reverted(env, tmp_path):
    """A candidate whose load runs out of memory: the admin call says so, nothing changes."""
    root, store = env
    from slotserve.bundles.demo import build_demo_model
    build_demo_model("llama", 7, tmp_path / "src")
    m = store.publish(tmp_path / "src", "demo", serving={"faults": {"oom_after": 0}}, reason="oom at load")

    async def go():
        ctl, rep, c = await _start(root, store)
        try:
            r = await c.post("/admin/load", json={"bundle": f"demo:{m.version}"}, headers=AUTH)
            assert r.status_code in (500, 507), r.text
            assert "out of memory" in r.json()["error"]["message"]
            st = (await c.get("/admin/state", headers=AUTH)).json()
            assert st["desired"]["candidate"] is None
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200
            r = await c.post("/admin/load", json={"bundle": "nope:3"}, headers=AUTH)
            assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
            r = await c.post("/admin/load", json={"bundel": "demo:2"}, headers=AUTH)
            assert r.status_code == 400
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())


def test_rollback_does_not_wait_for_a_running_load(env, tmp_path):
    """A candidate taking seconds to load must not delay a rollback on that replica."""
    root, store = env
    from slotserve.bundles.demo import build_demo_model
    build_demo_model("llama", 9, tmp_path / "src")
    big = store.publish(tmp_path / "src", "demo", reason="slow to load")

    async def go():
        ctl, rep, c = await _start(root, store)
        try:
            for path, body in (("/admin/load", {"bundle": "demo:2"}), ("/admin/rollout/promote", {})):
                assert (await c.post(path, json=body, headers=AUTH)).status_code == 200
            real_load = rep.mgr.load

            def slow_load(*a, **kw):
                import time
                time.sleep(3.0)
                return real_load(*a, **kw)
            rep.mgr.load = slow_load
            loading = asyncio.create_task(c.post("/admin/load", json={"bundle": f"demo:{big.version}"},
                                                 headers=AUTH))
            for _ in range(200):
                if rep.loading:
                    break
                await asyncio.sleep(0.01)
            assert rep.loading
            r = await c.post("/admin/rollback", json={"reason": "during a load"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["converged"], r.text
            assert r.json()["converge_ms"] < 1000 and rep.loading  # the load is still running
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.json()["model"] == "demo:1"
            done = await loading   # the rollback released what this load staged: it says so
            assert done.status_code == 409 and done.json()["error"]["code"] == "superseded", done.text
            assert "nothing is staged" in done.json()["error"]["message"]
            assert "rollback to demo:1: during a load" in done.json()["error"]["message"]
            st = (await c.get("/admin/state", headers=AUTH)).json()
            assert st["desired"]["live"]["ref"] == "demo:1"
            assert st["desired"]["candidate"] is None  # the rollback released it
            for _ in range(800):       # the replica finishes the (unabortable, slowed) load, then drops it
                if rep.applied == ctl.core.state.version and "candidate" not in rep.backend.digests():
                    break
                await asyncio.sleep(0.01)
            assert rep.applied == ctl.core.state.version and "candidate" not in rep.backend.digests()
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())


def test_evict_previous_stops_advertising_it(env, tmp_path):
    """`load --evict-previous` drops previous on the replicas; the desired state must say so."""
    root, store = env
    from slotserve.bundles.demo import build_demo_model
    build_demo_model("llama", 21, tmp_path / "src")
    third = store.publish(tmp_path / "src", "demo", reason="needs the room")

    async def go():
        ctl = SlotController(str(root), app="evict", bundle="demo:1")
        rep = Replica(Settings(store=str(root), app="evict", admin_token_sha256=digest(TOKEN)),
                      LocalController(ctl), replica_id="r1")
        await rep.start()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
        try:
            for path, body in (("/admin/load", {"bundle": "demo:2"}), ("/admin/rollout/promote", {}),
                               ("/admin/load", {"bundle": third.ref, "evict_previous": True})):
                r = await c.post(path, json=body, headers=AUTH)
                assert r.status_code == 200, r.text
            st = (await c.get("/admin/state", headers=AUTH)).json()
            assert st["desired"]["previous"] is None and st["desired"]["candidate"]["ref"] == third.ref
            assert (await c.get("/healthz")).status_code == 200
            led = (await c.get("/admin/ledger", headers=AUTH)).json()["entries"]
            assert any(e["action"] == "evict" and e["bundle"] == "demo:1" for e in led)
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()

    asyncio.run(go())


def test_feedback_counts_a_real_response_once_across_replicas(env):
    """Two replicas of one app: an id issued by one is accepted by the other (same key),
    each replica answers a repeat with 409, and the controller counts the response once;
    a forged id carrying the public digest is refused and never reaches a guard window."""
    root, store = env

    async def go():
        ctl, rep, c = await _start(root, store)
        rep2 = Replica(Settings(store=str(root), app="local", admin_token_sha256=digest(TOKEN)),
                       LocalController(ctl), replica_id="r2")
        await rep2.start()
        c2 = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep2)), base_url="http://test2",
                               timeout=60)
        try:
            r = await c.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            rid = r.json()["id"]
            digest16 = r.json()["system_fingerprint"].split(":")[-1][:16]
            forged = await c.post("/v1/feedback", json={"id": f"chatcmpl-FAKE-{digest16}", "rating": "down"})
            assert forged.status_code == 404 and forged.json()["error"]["code"] == "unknown_id"
            first = await c.post("/v1/feedback", json={"id": rid, "rating": "down"})
            assert first.status_code == 200 and first.json()["slot"] == "live", first.text
            again = await c.post("/v1/feedback", json={"id": rid, "rating": "down"})
            assert again.status_code == 409 and again.json()["error"]["code"] == "already_rated"
            elsewhere = await c2.post("/v1/feedback", json={"id": rid, "rating": "down"})
            assert elsewhere.status_code == 200, elsewhere.text   # r2 has not seen it ...
            await rep.report()
            await rep2.report()
            live = ctl.core.windows["live"].snapshot(ctl.core.clock())
            assert live.feedback == 1 and live.thumbs_down == 1   # ... but the controller has
        finally:
            await c.aclose()
            await c2.aclose()
            await rep2.stop()
            await rep.stop()
            rep2.mgr.close()
            rep.mgr.close()

    asyncio.run(go())
