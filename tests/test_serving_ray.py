"""Real Ray Serve on 127.0.0.1 with the tiny demo bundles: one Ray start for the module.

Covers the official client shapes (chat + completions, streamed and not), admin auth,
load -> promote -> rollback under concurrent load with zero failed requests, a client
disconnect mid-stream, the bad-input table over HTTP, and scaling 1 -> 2 replicas with
the state carried to the new replica.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

TOKEN = "ray-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
APP = "slotserve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout=60.0, every=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from slotserve.api.auth import digest
    from slotserve.app import build_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store

    root = tmp_path_factory.mktemp("ray-store")
    store = Store(root)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    port = _free_port()
    from slotserve.cli.local_ray import start_local_ray
    start_local_ray(root / "run", num_cpus=2, include_dashboard=False, namespace="slotserve-test",
                    logging_level="ERROR", log_to_driver=False,
                    runtime_env={"env_vars": {"SLOTSERVE_HOME": str(root)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"store": str(root), "bundle": "demo:1", "app": APP, "admin_token_sha256": digest(TOKEN),
                "num_replicas": 1}
        if os.environ.get("SLOTSERVE_TEST_MANAGER"):
            args["manager"] = os.environ["SLOTSERVE_TEST_MANAGER"]
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "args": args, "build_app": build_app, "store": store}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def chat_body(model="demo", content="hello", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def test_official_client_shapes(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "system", "content": "be short"}, {"role": "user", "content": "hi"}],
        max_tokens=8, temperature=0, seed=1)
    assert raw.headers["x-slotserve-bundle"] == "demo:1"
    assert "x-slotserve-retrieval-index" in raw.headers
    r = raw.parse()
    assert r.model == "demo:1" and r.system_fingerprint.startswith("sha256:")
    assert r.choices[0].message.role == "assistant" and r.usage.total_tokens > 0
    assert r.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    assert all(c.model == "demo:1" for c in chunks)

    c = client.completions.create(model="demo", prompt="once upon a time", max_tokens=5, temperature=0)
    assert c.model == "demo:1" and c.usage.completion_tokens <= 5
    parts = list(client.completions.create(model="demo", prompt="once", max_tokens=5, stream=True))
    assert parts and all(p.model == "demo:1" for p in parts)

    models = client.models.list()
    assert [m.id for m in models.data][:2] == ["demo", "demo:1"]
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "demo:1" in str(ei.value)

    fb = httpx.post(server["url"] + "/v1/feedback", json={"id": r.id, "rating": "down"})
    assert fb.status_code == 200 and fb.json()["bundle"] == "demo:1"


BAD = [
    (b"{not json", 400), (b"[]", 400),
    (json.dumps(chat_body(messages=[])).encode(), 400),
    (json.dumps(chat_body(max_tokens=-1)).encode(), 400),
    (json.dumps(chat_body(max_tokens=10**9)).encode(), 400),
    (json.dumps(chat_body(temperature=3)).encode(), 400),
    (json.dumps(chat_body(max_tokens="lots")).encode(), 400),
    (json.dumps(chat_body(content="word " * 3000)).encode(), 400),
    (json.dumps(chat_body(model="nope")).encode(), 404),
]


def test_bad_input_over_http(server):
    url = server["url"]
    with httpx.Client(timeout=30) as c:
        for raw, status in BAD:
            r = c.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (raw[:60], r.status_code, r.text[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get(url + "/healthz").status_code == 200


def test_admin_auth(server):
    url = server["url"]
    for method, path in (("GET", "/admin/state"), ("POST", "/admin/rollback"), ("GET", "/admin/ledger"),
                         ("POST", "/admin/load"), ("GET", "/admin/rollout")):
        r = httpx.request(method, url + path, json={})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.request(method, url + path, json={}, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
    st = httpx.get(url + "/admin/state", headers=AUTH).json()
    assert st["desired"]["live"]["ref"] == "demo:1"
    assert st["replicas"] and all(r["ready"] for r in st["replicas"])


def test_disconnect_mid_stream_frees_the_request(server):
    url = server["url"]
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions",
                      json={"model": "demo", "prompt": "go", "max_tokens": 400, "stream": True,
                            "temperature": 1.0}) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(4)]
            assert any(g.startswith("data: ") for g in got)
        # the connection is closed: the replica must drop the request
        def idle():
            st = c.get(url + "/admin/state", headers=AUTH).json()
            return all(rep["inflight"] == 0 for rep in st["replicas"])
        _wait(idle, timeout=20)


def _load_gen(url, stop, results, model="demo"):
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.post(url + "/v1/chat/completions", json=chat_body(model=model, max_tokens=4))
                results.append((r.status_code, r.headers.get("x-slotserve-bundle"), time.perf_counter() - t0))
            except httpx.HTTPError as exc:
                results.append((599, str(exc), time.perf_counter() - t0))


def test_load_promote_rollback_under_load_fails_nothing(server):
    url = server["url"]
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load_gen, args=(url, stop, results)) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        r = httpx.post(url + "/admin/load", json={"bundle": "demo:2"}, headers=AUTH, timeout=300)
        assert r.status_code == 200 and r.json()["converged"], r.text
        time.sleep(0.5)
        r = httpx.post(url + "/admin/rollout/promote", json={"reason": "test"}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["converged"], r.text
        time.sleep(1.0)
        n_before = len(results)
        r = httpx.post(url + "/admin/rollback", json={"reason": "drill"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["converged"] and body["converge_ms"] < 2000
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [x for x in results if x[0] != 200]
    assert not failed, failed[:5]
    bundles = [b for _, b, _ in results]
    assert "demo:2" in bundles[:n_before] and bundles[-1] == "demo:1"
    st = httpx.get(url + "/admin/state", headers=AUTH).json()
    assert st["desired"]["live"]["ref"] == "demo:1" and st["desired"]["previous"]["ref"] == "demo:2"
    led = httpx.get(url + "/admin/ledger?limit=20", headers=AUTH).json()["entries"]
    assert [e["action"] for e in led if e["action"] in ("rollback", "promote")][:2] == ["rollback", "promote"]


def test_scale_to_two_replicas_carries_state(server):
    """A new replica loads the current live and previous before it takes traffic."""
    from ray import serve
    url = server["url"]
    serve.run(server["build_app"]({**server["args"], "num_replicas": 2}), name=APP, route_prefix="/")

    def two_ready():
        st = httpx.get(url + "/admin/state", headers=AUTH).json()
        reps = [r for r in st["replicas"] if r["ready"]]
        return st if len(reps) == 2 else None
    st = _wait(two_ready, timeout=120)
    live, prev = st["desired"]["live"]["ref"], st["desired"]["previous"]["ref"]
    for rep in st["replicas"]:
        assert rep["applied"] == st["version"]
    seen = set()
    with httpx.Client(timeout=30) as c:
        for _ in range(20):
            r = c.post(url + "/v1/chat/completions", json=chat_body(max_tokens=2))
            assert r.status_code == 200 and r.headers["x-slotserve-bundle"] == live
            seen.add(c.get(url + "/healthz").json()["replica"])
    # A rollback reaches both replicas.
    r = httpx.post(url + "/admin/rollback", json={"reason": "two replicas"}, headers=AUTH, timeout=60).json()
    assert r["converged"] and r["replicas"] == 2
    st = httpx.get(url + "/admin/state", headers=AUTH).json()
    assert st["desired"]["live"]["ref"] == prev and st["desired"]["previous"]["ref"] == live


def test_a_replica_that_dies_comes_back_with_the_same_state(server):
    import ray
    url = server["url"]
    before = httpx.get(url + "/admin/state", headers=AUTH).json()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "SlotServe" in a["name"]]
    assert names
    victim = ray.get_actor(names[0], namespace="serve")
    ray.kill(victim, no_restart=True)
    # Serve starts a replacement; it loads live and previous before it is routed to.
    def back():
        st = httpx.get(url + "/admin/state", headers=AUTH).json()
        ready = [r for r in st["replicas"] if r["ready"] and r["applied"] == st["version"]]
        fresh = {r["id"] for r in ready} - {r["id"] for r in before["replicas"]}
        return st if fresh and len(ready) >= len(before["replicas"]) else None
    st = _wait(back, timeout=120)
    for rep in st["replicas"]:
        slots = rep["slots"]["slots"]
        if rep["ready"]:
            assert slots["live"]["ref"] == st["desired"]["live"]["ref"]
            assert slots["previous"]["ref"] == st["desired"]["previous"]["ref"]
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=60)
    assert r.status_code == 200 and r.headers["x-slotserve-bundle"] == st["desired"]["live"]["ref"]
