"""Rollouts between LoRA adapter versions, end to end through the HTTP API in one process (no
Ray): a canary between two adapter versions of one base runs behind the eval gate in ONE
engine (the candidate joins live's engine; both versions answer from it), guards roll back
a failing adapter version with no client failure and leave the base engine serving, shadow
traffic between an adapter version and its plain base is compared, feedback on an adapter
version's answer is counted, and `slotserve drill` rehearses a rollback on an adapter version
live. Nothing here knows about adapters but the asserts: the slot
abstraction (engine, adapter) is what the rollout machinery drives unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import build_demo_adapter, publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

TOKEN = "adapter-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-rollouts")
    s = Store(root / "home")
    publish_demo(s, "base", seed=0)                                              # base:1
    model = s.path_of("base", 1) / "model"
    evals = root / "eval.jsonl"
    evals.write_text('{"prompt": "hello", "expected": ""}\n{"messages": [{"role": "user", "content": "hi"}], '
                     '"expected": ""}\n')
    ads = [build_demo_adapter(model, root / f"a{i}", seed=i, rank=4, std=0.3) for i in (1, 2, 3)]
    s.publish(ads[0], "bot", base="base:1", eval_file=evals)                     # bot:1
    s.publish(ads[1], "bot", base="base:1", eval_file=evals)                     # bot:2
    s.publish(ads[2], "bot", base="base:1", serving={"faults": {"error_rate": 1.0}})   # bot:3, erroring
    return s


@contextlib.asynccontextmanager
async def serving(store, app, bundle="bot:1"):
    ctl = SlotController(str(store.root), app=app, bundle=bundle)
    rep = Replica(Settings(store=str(store.root), app=app, admin_token_sha256=digest(TOKEN),
                           report_interval_s=0.05), LocalController(ctl), replica_id="r1")
    await rep.start()
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
    try:
        yield c, ctl, rep
    finally:
        await c.aclose()
        await rep.stop()
        ctl.stop()
        rep.mgr.close()


async def run_until(c, done, model="bot", timeout=300):
    """Four clients send chat requests until `done(rollout status)`; -> (results, last status)."""
    results, state, t0 = [], {}, time.time()

    async def watcher():
        while time.time() - t0 < timeout:
            state["r"] = (await c.get("/admin/rollout", headers=AUTH)).json()
            if done(state["r"]):
                return
            await asyncio.sleep(0.05)

    async def client(i):
        k = 0
        while not w.done():
            k += 1
            r = await c.post("/v1/chat/completions", headers={"x-session-id": f"user-{i}-{k}"},
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            results.append((r.status_code, r.headers.get("x-slotserve-bundle"), r.json().get("id")))
            await asyncio.sleep(0)

    w = asyncio.create_task(watcher())
    await asyncio.gather(*(client(i) for i in range(4)))
    await w
    assert done(state["r"]), state["r"]
    return results, state["r"]


def test_canary_between_two_adapter_versions_runs_in_one_engine(store):
    async def go():
        async with serving(store, "adapter-canary") as (c, ctl, rep):
            engine = rep.mgr.slot("live").engine
            spec = {"bundle": "bot:2", "strategy": "canary", "steps": [50, 100], "bake": "0.6s", "min_requests": 4,
                    "sticky_key": "header:x-session-id",
                    "guards": [{"metric": "error_rate", "op": ">", "value": 0.5, "action": "rollback"},
                               {"metric": "eval_score", "op": "<", "value": 0.9, "relative_to": "live",
                                "action": "rollback"}]}
            r = await c.post("/admin/rollout", json=spec, headers=AUTH)
            assert r.status_code == 200 and r.json()["state"]["rollout_phase"] == "pending_eval", r.text
            seen = {}

            def done(s):
                cand = rep.mgr.get("candidate")
                if s["phase"] == "running" and cand is not None:
                    seen["engines"] = {id(cand.engine), id(rep.mgr.slot("live").engine)}
                    seen["kv"] = rep.mgr.state()["candidate"].kv_bytes
                return s["phase"] in ("promoted", "rolled_back", "aborted")

            results, st = await run_until(c, done)
            assert st["phase"] == "promoted", st
            assert all(code == 200 for code, *_ in results)
            assert {"bot:1", "bot:2"} <= {b for _, b, _ in results}      # both versions answered ...
            assert seen["engines"] == {id(engine)} and seen["kv"] == 0     # ... from one engine, one KV pool
            led = [e["action"] for e in (await c.get("/admin/ledger", headers=AUTH)).json()["entries"]]
            assert "eval" in led and "promote" in led
            # promoted: a pointer swap, the same engine serves bot:2 live and bot:1 as previous
            assert rep.mgr.slot("live").engine is engine and rep.mgr.slot("previous").engine is engine
            assert sorted(engine.adapters.names) == ["bot:1", "bot:2"]
            # feedback on an adapter version's answer is counted for its slot
            rid = results[-1][2]
            fb = await c.post("/v1/feedback", json={"id": rid, "rating": "up"})
            assert fb.status_code == 200 and fb.json()["slot"] == "live", fb.text
            # rollback: still the same engine, the old version answers again
            r = await c.post("/admin/rollback", json={"reason": "test"}, headers=AUTH)
            assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user",
                                                                                      "content": "hi"}],
                                                           "max_tokens": 2})
            assert r.headers["x-slotserve-bundle"] == "bot:1" and rep.mgr.slot("live").engine is engine
    asyncio.run(go())


def test_failing_adapter_version_is_rolled_back_and_the_base_engine_keeps_serving(store):
    async def go():
        async with serving(store, "adapter-guard") as (c, ctl, rep):
            engine = rep.mgr.slot("live").engine
            spec = {"bundle": "bot:3", "strategy": "canary", "steps": [50, 100], "bake": "30s", "min_requests": 4,
                    "guards": [{"metric": "error_rate", "op": ">", "value": 0.2, "action": "rollback",
                                "min_samples": 5}]}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back"))
            assert st["phase"] == "rolled_back" and "error_rate" in st["reason"]
            assert all(code == 200 for code, *_ in results)          # failures were answered by live
            assert all(b == "bot:1" for _, b, _ in results)
            for _ in range(100):                                     # the released candidate drains
                if rep.mgr.get("candidate") is None and not rep.mgr.state().draining:
                    break
                await asyncio.sleep(0.05)
            assert rep.mgr.get("candidate") is None
            assert rep.mgr.slot("live").engine is engine and not engine.closed
            assert "bot:3" not in engine.adapters.names
    asyncio.run(go())


def test_shadow_between_an_adapter_version_and_its_plain_base(store):
    async def go():
        async with serving(store, "adapter-shadow") as (c, ctl, rep):
            spec = {"bundle": "base:1", "strategy": "shadow", "shadow_fraction": 1.0, "bake": "1s",
                    "min_requests": 4}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            seen = {}

            def done(s):
                if s["phase"] == "running" and s.get("requests"):
                    seen["shadow"] = s["windows"]["candidate"]["shadow_length_samples"]
                    cand = rep.mgr.get("candidate")
                    seen["shared"] = cand is not None and cand.engine is rep.mgr.slot("live").engine
                return seen.get("shadow", 0) >= 4

            results, st = await run_until(c, done)
            assert seen["shared"] and seen["shadow"] >= 4
            assert all(code == 200 for code, *_ in results) and all(b == "bot:1" for _, b, _ in results)
            assert (await c.post("/admin/rollout/abort", json={"reason": "done"}, headers=AUTH)).status_code == 200
    asyncio.run(go())


def test_drill_on_an_adapter_version(tmp_path, capsys):
    """`slotserve drill --url` against a deployment whose live is an adapter version: the drill
    publishes live again with faults (an adapter version on the same base, by digest), rolls
    it out and sees it rolled back with no failed request."""
    import json

    import httpx as sync_httpx

    from slotserve.cli import main
    from slotserve.drill.server import LocalServer

    with LocalServer(str(tmp_path / "home"), real=False) as srv:
        store = Store(srv.root)
        base = store.manifest(srv.live)
        ad = build_demo_adapter(store.path_of(base.name, base.version) / "model", tmp_path / "ad", seed=4, std=0.3)
        m = store.publish(ad, base.name, base=srv.live)                  # demo:2, an adapter version
        h = {"authorization": f"Bearer {srv.token}"}
        assert sync_httpx.post(f"{srv.url}/admin/load", json={"bundle": m.ref}, headers=h, timeout=60).status_code == 200
        assert sync_httpx.post(f"{srv.url}/admin/rollout/promote", json={"reason": "t"}, headers=h,
                               timeout=60).status_code == 200
        rc = main(["drill", "--url", srv.url, "--token", srv.token, "--store", str(srv.root),
                   "--fault", "error_rate=0.5", "--percent", "50", "--concurrency", "3", "--duration", "60",
                   "--baseline", "2", "--settle", "2", "--json"])
        rep = json.loads(capsys.readouterr().out)
        assert rc == 0, (rep["problems"], rep["warnings"])
        assert rep["passed"] and rep["outcome"] == "rolled_back" and rep["figures"]["failed_requests"] == 0
        faulty = store.manifest(f"{base.name}:3")
        assert faulty.adapter is not None and faulty.adapter.base == base.digest and faulty.has_faults
        state = sync_httpx.get(f"{srv.url}/admin/state", headers=h, timeout=60).json()
        assert state["desired"]["live"]["ref"] == m.ref
