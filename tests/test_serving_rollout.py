"""Rollouts driven end to end through the HTTP API in one process (no Ray): the
controller's tick loop, replica windows, guards, ledger and alert webhook, on the tiny
demo bundles with injected faults. Clients must never see a failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import build_demo_model, publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

TOKEN = "rollout-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-store")
    s = Store(root)
    publish_demo(s, "demo", seed=0)                     # demo:1 live
    publish_demo(s, "demo", seed=1)                     # demo:2 healthy candidate
    for seed, faults in ((2, {"error_rate": 1.0}), (3, {"oom_after": 1}),    # demo:3, demo:4
                         (4, {"latency_ms": 300})):                          # demo:5
        src = tmp_path_factory.mktemp(f"src{seed}")
        build_demo_model("llama", seed, src)
        s.publish(src, "demo", serving={"faults": faults}, reason="drill bundle")
    return s


@contextlib.asynccontextmanager
async def serving(store, app):
    ctl = SlotController(str(store.root), app=app, bundle="demo:1")
    rep = Replica(Settings(store=str(store.root), app=app, admin_token_sha256=digest(TOKEN),
                           report_interval_s=0.05), LocalController(ctl), replica_id="r1")
    await rep.start()
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
    try:
        yield c, ctl
    finally:
        await c.aclose()
        await rep.stop()
        ctl.stop()
        rep.mgr.close()


async def traffic(c, until, results, n_clients=4, extra=None):
    async def one(i):
        k = 0
        while not until():
            k += 1
            r = await c.post("/v1/chat/completions", headers={"x-session-id": f"user-{i}-{k}"},
                             json={"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 3, **(extra or {})})
            results.append((r.status_code, r.headers.get("x-slotserve-bundle")))
            await asyncio.sleep(0)  # in-process transport: let the controller and watcher run
    await asyncio.gather(*(one(i) for i in range(n_clients)))


async def phase(c):
    return (await c.get("/admin/rollout", headers=AUTH)).json()


async def run_until(c, done, timeout=60, extra=None):
    results = []
    t0 = time.time()
    state = {}

    async def watcher():
        while time.time() - t0 < timeout:
            state["r"] = await phase(c)
            if done(state["r"]):
                return
            await asyncio.sleep(0.05)

    w = asyncio.create_task(watcher())
    await traffic(c, lambda: w.done(), results, extra=extra)
    await w
    assert done(state["r"]), state["r"]
    return results, state["r"]


def test_healthy_canary_ramps_and_promotes(store):
    async def go():
        async with serving(store, "canary-ok") as (c, ctl):
            spec = {"bundle": "demo:2", "strategy": "canary", "steps": [50, 100], "bake": "0.6s",
                    "min_requests": 4, "sticky_key": "header:x-session-id",
                    "guards": [{"metric": "error_rate", "op": ">", "value": 0.5, "action": "rollback"}]}
            r = await c.post("/admin/rollout", json=spec, headers=AUTH)
            assert r.status_code == 200, r.text
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back"))
            assert st["phase"] == "promoted"
            assert all(code == 200 for code, _ in results)
            assert {"demo:1", "demo:2"} <= {b for _, b in results}
            s = (await c.get("/admin/state", headers=AUTH)).json()
            assert s["desired"]["live"]["ref"] == "demo:2" and s["desired"]["previous"]["ref"] == "demo:1"
            acts = [e["action"] for e in (await c.get("/admin/ledger", headers=AUTH)).json()["entries"]]
            assert "rollout_start" in acts and "rollout_step" in acts and "promote" in acts
            # a second rollout while none is active is fine; an impossible spec is refused first
            r = await c.post("/admin/rollout", json={"bundle": "demo:1", "steps": [5, 1]}, headers=AUTH)
            assert r.status_code == 400 and "increasing" in r.json()["error"]["message"]
    asyncio.run(go())


def test_erroring_candidate_is_rolled_back_without_client_failures(store):
    async def go():
        async with serving(store, "canary-err") as (c, ctl):
            spec = {"bundle": "demo:3", "strategy": "canary", "steps": [50, 100], "bake": "30s",
                    "min_requests": 4,
                    "guards": [{"metric": "error_rate", "op": ">", "value": 0.2, "action": "rollback",
                                "min_samples": 5}]}
            r = await c.post("/admin/rollout", json=spec, headers=AUTH)
            assert r.status_code == 200, r.text
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back"))
            assert st["phase"] == "rolled_back" and "error_rate" in st["reason"]
            assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
            assert all(b == "demo:1" for _, b in results)  # failures were answered by live
            s = (await c.get("/admin/state", headers=AUTH)).json()
            assert s["desired"]["live"]["ref"] == "demo:1" and s["desired"]["candidate"] is None
            led = (await c.get("/admin/ledger", headers=AUTH)).json()["entries"]
            rb = next(e for e in led if e["action"] == "rollback")
            assert rb["metrics"]["trigger"] == "guard" and "candidate.error_rate" in rb["metrics"]
    asyncio.run(go())


def test_oom_candidate_is_released_and_reverted(store):
    async def go():
        async with serving(store, "canary-oom") as (c, ctl):
            spec = {"bundle": "demo:4", "strategy": "canary", "steps": [50, 100], "bake": "30s",
                    "min_requests": 4, "guards": [{"metric": "oom_events", "op": ">", "value": 0,
                                                   "action": "rollback"}]}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back"))
            assert st["phase"] == "rolled_back" and "out of memory" in st["reason"]
            assert all(code == 200 for code, _ in results)
    asyncio.run(go())


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        _Hook.received.append(json.loads(self.rfile.read(n)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_alert_guard_posts_webhook_and_does_not_roll_back(store):
    srv = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/hook"

    async def go():
        async with serving(store, "canary-alert") as (c, ctl):
            spec = {"bundle": "demo:3", "strategy": "canary", "steps": [50, 100], "bake": "30s",
                    "min_requests": 4, "alert_webhook": url,
                    "guards": [{"metric": "error_rate", "op": ">", "value": 0.2, "action": "alert",
                                "min_samples": 5}]}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            results, st = await run_until(c, lambda s: s.get("paused"))
            assert st["phase"] == "running" and st["weights"]["candidate"] == 50
            for _ in range(50):
                if _Hook.received:
                    break
                await asyncio.sleep(0.1)
            assert _Hook.received and _Hook.received[0]["event"] == "Alerted"
            assert all(code == 200 for code, _ in results)
            r = await c.post("/admin/rollout/abort", json={"reason": "human says no"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["state"]["desired"]["candidate"] is None
    try:
        asyncio.run(go())
    finally:
        srv.shutdown()


def test_blue_green_mirrors_then_flips(store):
    """Mirrored (shadow) traffic is compared and counted before all traffic flips."""
    async def go():
        async with serving(store, "blue-green") as (c, ctl):
            spec = {"bundle": "demo:2", "strategy": "blue_green", "shadow_fraction": 1.0, "bake": "1s",
                    "min_requests": 4}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            seen = {}

            def done(s):
                if s["phase"] == "running" and s["step"] == 0 and s.get("requests"):
                    seen["mirrored"] = s["requests"]
                    seen["shadow"] = s["windows"]["candidate"]["shadow_length_samples"]
                return s["phase"] in ("promoted", "rolled_back")
            results, st = await run_until(c, done)
            assert st["phase"] == "promoted", st
            assert seen.get("mirrored", 0) > 0 and seen.get("shadow", 0) > 0
            assert all(code == 200 for code, _ in results)
            # while mirrored, clients were answered by live only
            first_demo2 = next(i for i, (_, b) in enumerate(results) if b == "demo:2")
            assert first_demo2 > 0 and all(b == "demo:1" for _, b in results[:first_demo2])
    asyncio.run(go())


def test_eval_gate_runs_before_the_first_step(store, tmp_path):
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"prompt": "hello", "expected": ""}\n{"messages": [{"role": "user", "content": "hi"}], '
                     '"expected": ""}\n')
    src = tmp_path / "src"
    build_demo_model("llama", 5, src)
    m = store.publish(src, "evalbot", eval_file=evals, reason="with eval set")
    ref = f"evalbot:{m.version}"

    async def go():
        async with serving(store, "eval-gate") as (c, ctl):
            spec = {"bundle": ref, "strategy": "canary", "steps": [100], "bake": "0.2s", "min_requests": 2,
                    "guards": [{"metric": "eval_score", "op": "<", "value": 0.9, "relative_to": "live",
                                "action": "rollback"}]}
            r = await c.post("/admin/rollout", json=spec, headers=AUTH)
            assert r.status_code == 200 and r.json()["state"]["rollout_phase"] == "pending_eval", r.text
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back", "aborted"))
            assert st["phase"] == "promoted", st
            led = [e["action"] for e in (await c.get("/admin/ledger", headers=AUTH)).json()["entries"]]
            assert "eval" in led
            # the logical name stays "demo" although the new live is called evalbot
            assert all(code == 200 for code, _ in results) and results[-1][1] == ref
    asyncio.run(go())


def test_rollouts_that_cannot_run_are_refused_up_front(store):
    """400 invalid_spec before anything loads or starts: no bundle in the spec, and an
    eval_score guard on a candidate without an eval set (it used to start, then abort)."""
    async def go():
        async with serving(store, "refusals") as (c, ctl):
            r = await c.post("/admin/rollout", json={}, headers=AUTH)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_spec", r.text
            assert "bundle" in r.json()["error"]["message"]
            spec = {"bundle": "demo:2", "strategy": "canary", "steps": [100], "bake": "0.2s",
                    "guards": [{"metric": "eval_score", "op": "<", "value": 0.9, "relative_to": "live"}]}
            r = await c.post("/admin/rollout", json=spec, headers=AUTH)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_spec", r.text
            assert "eval/eval.jsonl" in r.json()["error"]["message"]
            st = (await c.get("/admin/state", headers=AUTH)).json()
            assert st["desired"]["candidate"] is None and (await c.get("/admin/rollout", headers=AUTH)).json().get("phase") in (None, "none")
    asyncio.run(go())


def test_slow_candidate_is_rolled_back_by_relative_latency(store):
    async def go():
        async with serving(store, "canary-slow") as (c, ctl):
            spec = {"bundle": "demo:5", "strategy": "canary", "steps": [50, 100], "bake": "30s",
                    "min_requests": 4,
                    "guards": [{"metric": "p99_latency_ms", "op": ">", "value": 1.5, "relative_to": "live",
                                "action": "rollback", "min_samples": 5}]}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back"))
            assert st["phase"] == "rolled_back" and "p99_latency_ms" in st["reason"], st
            assert all(code == 200 for code, _ in results)   # slow, not failed
    asyncio.run(go())


async def _greedy(c, model: str, *, chat: bool, max_tokens: int, text: str) -> str:
    """What `model` (a slot pinned by name:version) answers greedily."""
    if chat:
        r = await c.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                                                       "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    r = await c.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": max_tokens,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _publish(store, tmp_path, seed: int, **kw) -> str:
    src = tmp_path / f"src{seed}"
    build_demo_model("llama", seed, src)
    m = store.publish(src, "demo", reason="rollout test candidate", **kw)
    return m.ref


def test_candidate_tripping_the_safety_filter_is_rolled_back(store, tmp_path):
    """The candidate says something live never says; the filter is told to block it."""
    cand = _publish(store, tmp_path, 11)

    async def probe():   # what each bundle answers greedily, read through pinned requests
        async with serving(store, "safety-probe") as (c, ctl):
            assert (await c.post("/admin/load", json={"bundle": cand}, headers=AUTH)).status_code == 200
            return (await _greedy(c, cand, chat=True, max_tokens=3, text="hi"),
                    await _greedy(c, "demo:1", chat=True, max_tokens=3, text="hi"))
    said, live_said = asyncio.run(probe())
    assert said.strip() and said != live_said, (said, live_said)

    async def go():
        async with serving(store, "canary-safety") as (c, ctl):
            spec = {"bundle": cand, "strategy": "canary", "steps": [50, 100], "bake": "30s", "min_requests": 4,
                    "safety": {"patterns": [re.escape(said)], "include_defaults": False},
                    "guards": [{"metric": "safety_hit_rate", "op": ">", "value": 0.2, "action": "rollback",
                                "min_samples": 5}]}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back"),
                                          extra={"temperature": 0})
            assert st["phase"] == "rolled_back" and "safety_hit_rate" in st["reason"], st
            assert all(code == 200 for code, _ in results)
    asyncio.run(go())


def test_candidate_failing_its_eval_is_rolled_back_before_taking_traffic(store, tmp_path):
    """The eval set expects live's exact answer; a different model cannot give it."""
    async def probe():
        async with serving(store, "eval-probe") as (c, ctl):
            return await _greedy(c, "demo:1", chat=False, max_tokens=32, text="hello")
    expected = asyncio.run(probe())
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "hello", "expected": expected, "match": "exact"}) + "\n")
    cand = _publish(store, tmp_path, 12, eval_file=evals)

    async def go():
        async with serving(store, "eval-fail") as (c, ctl):
            spec = {"bundle": cand, "strategy": "canary", "steps": [50, 100], "bake": "30s", "min_requests": 4,
                    "guards": [{"metric": "eval_score", "op": "<", "value": 0.95, "relative_to": "live",
                                "action": "rollback"}]}
            assert (await c.post("/admin/rollout", json=spec, headers=AUTH)).status_code == 200
            results, st = await run_until(c, lambda s: s["phase"] in ("promoted", "rolled_back", "aborted"))
            assert st["phase"] == "rolled_back" and "eval_score" in st["reason"], st
            assert all(code == 200 for code, _ in results)
            assert all(b == "demo:1" for _, b in results)   # gated: the candidate never answered
    asyncio.run(go())


def test_manual_rollback_releases_the_staged_candidate_on_every_replica(store):
    """A rollback leaves no candidate behind: the replica drops it, and a replica that
    starts afterwards (reconciling to the desired state) does not load it again."""
    async def go():
        async with serving(store, "manual-rollback") as (c, ctl):
            for path, body in (("/admin/load", {"bundle": "demo:2"}), ("/admin/rollout/promote", {}),
                               ("/admin/load", {"bundle": "demo:5"})):
                r = await c.post(path, json=body, headers=AUTH)
                assert r.status_code == 200 and r.json()["converged"], r.text
            r = await c.post("/admin/rollback", json={"reason": "demo:2 bad"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["converged"], r.text
            s = r.json()["state"]
            assert [(s["desired"][k] or {}).get("ref") for k in ("live", "previous", "candidate")] \
                == ["demo:1", "demo:2", None]
            (rep,) = s["replicas"]
            assert "candidate" not in rep["slots"]["slots"]
            late = Replica(Settings(store=str(store.root), app="manual-rollback"), LocalController(ctl),
                           replica_id="r2")
            await late.start()
            try:
                assert late.backend.digests().get("candidate") is None
                assert set(late.backend.digests()) >= {"live", "previous"}
            finally:
                await late.stop()
                late.mgr.close()
            led = (await c.get("/admin/ledger?bundle=demo:5", headers=AUTH)).json()["entries"]
            assert any(e["action"] == "abort" and "released by rollback" in e["reason"] for e in led)
    asyncio.run(go())
