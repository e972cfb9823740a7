"""Two Ray nodes on this machine (ray.cluster_utils.Cluster, both on 127.0.0.1): one
replica per node, both reading the one store; a rollback reaches both."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
TOKEN = "cluster-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_two_node_cluster(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import ray._private.ray_constants as ray_constants
    from ray import serve
    from ray.cluster_utils import Cluster

    from slotserve.api.auth import digest
    from slotserve.app import build_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.cli.local_ray import neutral_cwd

    store = Store(tmp_path)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Both nodes on 127.0.0.1; the agents pick free ports (two nodes on one machine). Ray
    # resolves "127.0.0.1" in an address to the machine's outside IP unless told it is
    # not a cluster, and nothing listens there: keep every connection on loopback.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "dashboard_agent_listen_port": 0}
    with neutral_cwd(tmp_path / "run"):  # never the repository root on the workers' sys.path
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        cluster.add_node(**node)
    try:
        with neutral_cwd(tmp_path / "run"):
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace="slotserve-cluster",
                     logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"store": str(tmp_path), "bundle": "demo:1", "app": "cluster",
                             "admin_token_sha256": digest(TOKEN), "num_replicas": 2,
                             "max_replicas_per_node": 1}), name="cluster", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            st = httpx.get(url + "/admin/state", headers=AUTH, timeout=30).json()
            if sum(r["ready"] for r in st["replicas"]) == 2 or time.time() - t0 > 120:
                break
            time.sleep(0.5)
        assert len({r["node"] for r in st["replicas"]}) == 2, st["replicas"]  # one per node
        r = httpx.post(url + "/admin/load", json={"bundle": "demo:2"}, headers=AUTH, timeout=300).json()
        assert r["converged"] and r["replicas"] == 2
        r = httpx.post(url + "/admin/rollout/promote", json={}, headers=AUTH, timeout=60).json()
        assert r["converged"] and r["state"]["desired"]["live"]["ref"] == "demo:2"
        r = httpx.post(url + "/admin/rollback", json={"reason": "cluster drill"}, headers=AUTH, timeout=60).json()
        assert r["converged"] and r["replicas"] == 2
        for _ in range(6):
            c = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert c.status_code == 200 and c.headers["x-slotserve-bundle"] == "demo:1"
        # One scrape of the API port shows the replicas of both nodes: each swapped once to
        # promote and once to roll back (their snapshots travel through the controller).
        from prometheus_client.parser import text_string_to_metric_families
        want = {(r["id"], a): 1.0 for r in st["replicas"] for a in ("promote", "rollback")}
        t0 = time.time()
        while True:
            text = httpx.get(url + "/metrics", timeout=30).text
            swaps = {(s.labels["replica"], s.labels["action"]): s.value
                     for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "slotserve_slot_swaps_total"}
            if swaps == want:
                break
            assert time.time() - t0 < 30, (swaps, want)
            time.sleep(0.3)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
