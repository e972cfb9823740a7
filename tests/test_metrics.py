"""GET /metrics as Prometheus scrapes it: the real app, two replicas and their controller in
this process (no Ray; tests/test_metrics_ray.py does it through Ray Serve), parsed with
prometheus_client's own parser. One scrape on either replica shows both."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
TOKEN = "metrics-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
REPLICA_FAMILIES = {
    "slotserve_requests", "slotserve_request_latency_seconds", "slotserve_time_to_first_token_seconds",
    "slotserve_inter_token_latency_seconds", "slotserve_prompt_tokens", "slotserve_tokens_generated",
    "slotserve_safety_hits", "slotserve_slot_swaps", "slotserve_requests_running", "slotserve_requests_waiting",
    "slotserve_kv_cache_usage_ratio", "slotserve_prefix_cache_queries", "slotserve_prefix_cache_hits",
    "slotserve_slot_memory_bytes", "slotserve_traffic_weight"}
APP_FAMILIES = {"slotserve_rollbacks", "slotserve_rollout_info", "slotserve_rollout_step",
                "slotserve_rollout_candidate_requests", "slotserve_rollout_guard_value",
                "slotserve_rollout_guard_threshold", "slotserve_rollout_guard_breached"}


class Scrape:
    """One parsed exposition: families by name, samples by (sample name, labels)."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, name: str, **labels) -> list[float]:
        return [s.value for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def one(self, name: str, **labels) -> float:
        got = self.get(name, **labels)
        assert len(got) == 1, (name, labels, got)
        return got[0]

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from slotserve.api.auth import digest
    from slotserve.api.routes import create_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.control.controller import SlotController
    from slotserve.replica import LocalController, Replica, Settings

    root = tmp_path_factory.mktemp("metrics")
    store = Store(root)
    for seed in (0, 1, 2):
        publish_demo(store, "demo", seed=seed)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    async def start():
        ctl = SlotController(str(root), app="metrics", bundle="demo:1")
        reps, clients = [], []
        for rid in ("r1", "r2"):
            rep = Replica(Settings(store=str(root), app="metrics", admin_token_sha256=digest(TOKEN)),
                          LocalController(ctl), replica_id=rid)
            await rep.start()
            reps.append(rep)
            clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)),
                                             base_url="http://test", timeout=300))
        return ctl, reps, clients

    ctl, reps, clients = run(start())

    class App:
        replicas = reps
        saved: dict = {}

        def call(self, i, method, path, body=None, **kw):
            return run(clients[i].request(method, path, json=body, **kw))

        def chat(self, i, content="hello", model="demo", **kw):
            body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                    "temperature": 0, **kw}
            r = self.call(i, "POST", "/v1/chat/completions", body)
            assert r.status_code == 200, r.text
            return r

        def scrape(self, i=0) -> Scrape:
            r = self.call(i, "GET", "/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            return Scrape(r.text)

        def scrape_until(self, pred, i=0, timeout=15.0) -> Scrape:
            t0 = time.monotonic()
            while True:
                s = self.scrape(i)
                if pred(s):
                    return s
                assert time.monotonic() - t0 < timeout, "the scrape never showed it:\n" + s.text
                time.sleep(0.2)

    try:
        yield App()
    finally:
        for c in clients:
            run(c.aclose())
        for rep in reps:
            run(rep.stop())
            rep.mgr.close()
        ctl.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_scrape_reports_requests_latencies_and_the_slots(app):
    app.chat(0)
    app.chat(0, stream=True)
    s = app.scrape(0)
    assert REPLICA_FAMILIES - {"slotserve_safety_hits", "slotserve_slot_swaps"} <= set(s.families)
    assert not any(n.startswith("ray_") or n.endswith("_ms") for n in s.families)
    live = {"bundle": "demo:1", "slot": "live", "replica": "r1"}
    assert s.one("slotserve_requests_total", status="ok", **live) == 2
    assert s.one("slotserve_request_latency_seconds_count", **live) == 2
    assert 0 < s.one("slotserve_request_latency_seconds_sum", **live) < 60      # seconds, not ms
    assert s.one("slotserve_time_to_first_token_seconds_count", **live) == 2
    assert s.one("slotserve_time_to_first_token_seconds_bucket", le="+Inf", **live) == 2
    assert s.one("slotserve_inter_token_latency_seconds_count", **live) >= 1
    assert s.one("slotserve_tokens_generated_total", **live) >= 2
    assert s.one("slotserve_prompt_tokens_total", **live) > 0
    assert s.one("slotserve_requests_running", **live) == 0 and s.one("slotserve_requests_waiting", **live) == 0
    assert 0 <= s.one("slotserve_kv_cache_usage_ratio", **live) <= 1
    assert s.one("slotserve_slot_memory_bytes", kind="held", tier="device", **live) > 0
    assert s.one("slotserve_traffic_weight", **live) == 100
    # the engine's counters: every prompt token admitted is a prefix-cache query
    assert s.one("slotserve_prefix_cache_queries_total", **live) == s.one("slotserve_prompt_tokens_total", **live)


def test_the_prefix_cache_hits_show(app):
    long = "the same long question about the weather " * 8
    app.chat(0, content=long)
    before = app.scrape(0).one("slotserve_prefix_cache_hits_total", bundle="demo:1", slot="live", replica="r1")
    app.chat(0, content=long)
    after = app.scrape(0).one("slotserve_prefix_cache_hits_total", bundle="demo:1", slot="live", replica="r1")
    assert after > before


def test_one_scrape_sees_every_replica(app):
    for _ in range(3):
        app.chat(1)
    # r2's requests reach a scrape on r1 through the controller (pushed within a second or so)
    s = app.scrape_until(lambda s: s.get("slotserve_requests_total", replica="r2", status="ok") == [3.0], i=0)
    assert s.label_values("slotserve_traffic_weight", "replica") == {"r1", "r2"}
    assert s.get("slotserve_requests_total", replica="r1", status="ok") == [4.0]
    # and the other way round: r2 shows r1's, each family once
    s2 = app.scrape_until(lambda s: s.get("slotserve_requests_total", replica="r1", status="ok") == [4.0], i=1)
    assert s2.text.count("# TYPE slotserve_requests_total counter") == 1


def test_swaps_and_rollbacks_are_counted(app):
    for path, body in (("/admin/load", {"bundle": "demo:2"}), ("/admin/rollout/promote", {"reason": "m"}),
                       ("/admin/rollback", {"reason": "metrics test"})):
        r = app.call(0, "POST", path, body, headers=AUTH)
        assert r.status_code == 200 and r.json()["converged"], r.text
    s = app.scrape_until(lambda s: s.get("slotserve_slot_swaps_total", action="rollback", replica="r2") == [1.0])
    for rid in ("r1", "r2"):
        assert s.one("slotserve_slot_swaps_total", action="promote", replica=rid) == 1
        assert s.one("slotserve_slot_swaps_total", action="rollback", replica=rid) == 1
    # rollbacks are the app's: counted once by the controller, not per replica
    assert s.get("slotserve_rollbacks_total", trigger="manual") == [1.0]
    assert s.label_values("slotserve_rollbacks_total", "replica") == set()
    # the slots' gauges follow: demo:2 now previous, demo:1 live again
    assert s.one("slotserve_slot_memory_bytes", bundle="demo:2", slot="previous", kind="held", replica="r1") > 0
    assert s.one("slotserve_traffic_weight", bundle="demo:1", slot="live", replica="r1") == 100
    assert s.get("slotserve_traffic_weight", bundle="demo:2", slot="live", replica="r1") == []   # no stale series


def test_guard_values_during_a_rollout(app):
    spec = {"bundle": "demo:3", "strategy": "canary", "steps": [50, 100], "bake": "600s", "min_requests": 1000,
            "guards": [{"metric": "error_rate", "op": ">", "value": 0.5, "action": "rollback", "min_samples": 1},
                       {"metric": "p99_latency_ms", "op": ">", "value": 600000, "action": "rollback",
                        "min_samples": 1}],
            "safety": {"patterns": ["."], "include_defaults": False}}   # every answer is a "hit"
    r = app.call(0, "POST", "/admin/rollout", spec, headers=AUTH)
    assert r.status_code == 200, r.text
    for _ in range(2):
        app.chat(0, model="demo:3")      # pinned to the candidate: counted in its window
    guard = {"bundle": "demo:3", "guard": "error_rate > 0.5", "action": "rollback"}
    s = app.scrape_until(lambda s: s.get("slotserve_rollout_guard_value", **guard) == [0.0])
    assert APP_FAMILIES <= set(s.families)
    assert s.one("slotserve_rollout_info", bundle="demo:3", live="demo:1", strategy="canary", phase="running") == 1
    assert s.one("slotserve_rollout_step", bundle="demo:3") == 0
    assert s.one("slotserve_rollout_candidate_requests", bundle="demo:3") == 2
    assert s.one("slotserve_rollout_guard_threshold", **guard) == 0.5
    assert s.one("slotserve_rollout_guard_breached", **guard) == 0
    p99 = s.one("slotserve_rollout_guard_value", bundle="demo:3", guard="p99_latency_ms > 600000", action="rollback")
    assert 0 < p99 < 600000
    assert s.one("slotserve_traffic_weight", bundle="demo:3", slot="candidate", replica="r1") == 50
    assert s.one("slotserve_safety_hits_total", bundle="demo:3", slot="candidate", replica="r1") == 2
    app.saved["during_rollout"] = s.text
    r = app.call(0, "POST", "/admin/rollout/abort", {"reason": "done"}, headers=AUTH)
    assert r.status_code == 200, r.text
    s = app.scrape(0)
    assert s.get("slotserve_rollout_guard_value") == [] and s.get("slotserve_rollout_info", phase="running") == []


def test_grafana_dashboard_uses_only_metrics_a_scrape_has(app):
    """Every metric name in examples/grafana-dashboard.json is a sample name in a real scrape
    (taken during a rollout, after a rollback: every series exists)."""
    text = app.saved.get("during_rollout")
    assert text, "runs after test_guard_values_during_a_rollout"
    scrape = Scrape(text)
    names = {s.name for s in scrape.samples}
    dash = json.loads((REPO / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"\bslotserve_[a-z0-9_]+", e)}
    assert used and used <= names, sorted(used - names)
    # and every family the server exports is on the dashboard
    assert set(scrape.families) == REPLICA_FAMILIES | APP_FAMILIES
    shown = {f for f, fam in scrape.families.items() if {x.name for x in fam.samples} & used}
    assert shown == set(scrape.families), sorted(set(scrape.families) - shown)
