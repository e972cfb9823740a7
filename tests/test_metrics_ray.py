"""GET /metrics through real Ray Serve with two replicas: Serve's proxy hands each scrape to
one replica process, and that one scrape shows both replicas' series (pushed through the
controller actor), parsed with prometheus_client's parser."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
TOKEN = "metrics-ray-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
APP = "metrics-ray"
CHAT = {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def _samples(text: str):
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_one_scrape_shows_both_replicas(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import serve

    from slotserve.api.auth import digest
    from slotserve.app import build_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.cli.local_ray import start_local_ray

    publish_demo(Store(tmp_path), "demo", seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_local_ray(tmp_path / "run", num_cpus=2, include_dashboard=False, namespace="slotserve-metrics",
                    logging_level="ERROR", log_to_driver=False,
                    runtime_env={"env_vars": {"SLOTSERVE_HOME": str(tmp_path)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"store": str(tmp_path), "bundle": "demo:1", "app": APP,
                             "admin_token_sha256": digest(TOKEN), "num_replicas": 2}),
                  name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            t0, ok = time.time(), {}
            while True:
                st = c.get("/admin/state", headers=AUTH).json()
                ready = sorted(r["id"] for r in st["replicas"] if r["ready"])
                if len(ready) == 2:
                    break
                assert time.time() - t0 < 180, st
                time.sleep(0.5)
            # Requests (8 at a time: Serve's proxy spreads them) until a scrape shows both
            # replicas answered some, and their counts add up to what was sent (the other
            # replica's snapshot is pushed through the controller within a second or so).
            sent, scrapers, t0 = 0, set(), time.time()
            with ThreadPoolExecutor(8) as pool:
                while True:
                    if time.time() - t0 < 90 and (sent < 16 or len(ok) < 2):
                        codes = list(pool.map(lambda _: c.post("/v1/chat/completions", json=CHAT).status_code,
                                              range(8)))
                        assert codes == [200] * 8
                        sent += 8
                    r = c.get("/metrics")
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
                    scrapers.add(r.headers["x-slotserve-replica"])
                    samples = _samples(r.text)
                    names = {s.name for s in samples}
                    assert not any(n.startswith("ray_") for n in names)
                    weights = {s.labels["replica"] for s in samples if s.name == "slotserve_traffic_weight"}
                    ok = {s.labels["replica"]: s.value for s in samples
                          if s.name == "slotserve_requests_total" and s.labels.get("status") == "ok"}
                    if weights == set(ok) == set(ready) and sum(ok.values()) == sent and scrapers == set(ready):
                        break
                    assert time.time() - t0 < 120, (weights, ok, sent, scrapers)
                    time.sleep(0.2)
            # both replicas rendered a scrape, and the last one, whichever it was, showed both
            # replicas' gauges and requests
            assert {"slotserve_time_to_first_token_seconds_bucket", "slotserve_kv_cache_usage_ratio",
                    "slotserve_requests_running", "slotserve_prefix_cache_hits_total"} <= names
            assert c.get("/health").status_code == 200 and c.get("/version").json()["live"] == "demo:1"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
