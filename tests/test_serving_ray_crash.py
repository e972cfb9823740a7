"""A replica killed under load on real Ray Serve (issue 14 #4): the Gateway retries every
request that had received nothing yet on the other replica, and a stream cut mid-answer
ends with an OpenAI error event, never Ray's plain-text 500. Two replicas on 127.0.0.1
serve the tiny demo bundle with a 4 s injected latency (slots/faults.py), so requests are
surely in flight, with nothing sent, when their replica dies; one Ray start for the module."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

APP = "slotserve-crash"
LATENCY_MS = 4000
TOKEN = "crash-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from slotserve.app import build_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.cli.local_ray import start_local_ray
    from slotserve.api.auth import digest
    from slotserve.drill.config import publish_faulty

    root = tmp_path_factory.mktemp("ray-crash-store")
    store = Store(root)
    publish_demo(store, "demo", seed=0)
    slow = publish_faulty(store, "demo:1", {"latency_ms": LATENCY_MS})
    model = store.path_of("demo", 1) / "model"       # the engine stops on both files' ids
    ids = [json.loads((model / f).read_text()).get("eos_token_id") for f in ("config.json", "generation_config.json")]
    # the demo tokenizer's specials are ids 0-4 (pad, bos, eos, im_start, im_end): banning them
    # all, with the model's end-of-sequence ids, leaves nothing that can end an answer early
    eos = sorted({i for x in ids for i in (x if isinstance(x, list) else [x]) if i is not None} | set(range(5)))
    port = _free_port()
    start_local_ray(root / "run", num_cpus=2, include_dashboard=False, namespace=APP,
                    logging_level="ERROR", log_to_driver=False,
                    runtime_env={"env_vars": {"SLOTSERVE_HOME": str(root)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"store": str(root), "bundle": slow, "app": APP, "num_replicas": 2,
                             "admin_token_sha256": digest(TOKEN)}),
                  name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "eos": eos}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _kill(replica_id: str) -> None:
    import ray
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"#SlotServe#{replica_id}" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)   # as a crash: no drain


def _inflight(url: str) -> dict[str, int]:
    """Requests each ready replica is answering, as they report it (every 0.1 s)."""
    st = httpx.get(url + "/admin/state", headers={"authorization": f"Bearer {TOKEN}"}, timeout=60).json()
    return {r["id"]: r["inflight"] for r in st["replicas"] if r["ready"]}


def _wait(pred, timeout: float, every: float = 0.05):
    t0 = time.time()
    while not (v := pred()) and time.time() - t0 < timeout:
        time.sleep(every)
    return v


def test_a_killed_replica_loses_no_request_that_had_not_started_answering(server):
    url, eos = server["url"], server["eos"]
    # long answers (every end-of-sequence id banned), each after the bundle's 4 s latency
    body = {"model": "demo", "messages": [{"role": "user", "content": "count"}], "max_tokens": 440,
            "temperature": 1.0, "logit_bias": {str(t): -100 for t in eos}}
    assert httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=120).status_code == 200
    assert len(_wait(lambda: len(_inflight(url)) == 2 and _inflight(url), 120)) == 2

    # 1. a stream that had begun cannot move: it ends with an error event, then [DONE]
    with httpx.Client(timeout=300) as c, c.stream("POST", url + "/v1/chat/completions",
                                                  json={**body, "stream": True}) as stream:
        assert stream.status_code == 200, stream.read()
        victim = stream.headers["x-slotserve-replica"]
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
        _kill(victim)                             # 440 tokens take far longer than this
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    err = json.loads(events[-2])["error"]
    assert err["code"] == "replica_unavailable" and "ActorDiedError" in err["message"], err

    # 2. requests that had sent nothing back: every one is answered whole, those on the
    # killed replica by another one (Serve has replaced the first victim by now)
    assert _wait(lambda: len(r := _inflight(url)) == 2 and victim not in r, 180), "no replacement replica"
    answered: set[str] = set()                    # ... and the Gateway routes to it (GET /health)
    assert _wait(lambda: answered.add(httpx.get(url + "/health", timeout=30).headers["x-slotserve-replica"])
                 or answered == set(_inflight(url)), 120)
    results: list[httpx.Response | BaseException] = []

    def one():
        try:
            results.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=300))
        except BaseException as exc:              # noqa: BLE001 (reported below)
            results.append(exc)
    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    seen = []
    now = _wait(lambda: seen.append(x := _inflight(url)) or sum(x.values()) == 12 and x, 3.5)
    assert now and not results, (seen[-3:], results)     # all twelve routed within the 4 s they wait
    victim = max(now, key=now.get)
    _kill(victim)
    for t in threads:
        t.join()
    assert all(isinstance(r, httpx.Response) for r in results), results
    assert [r.status_code for r in results] == [200] * 12, [r.text[:200] for r in results if r.status_code != 200]
    retried = [r for r in results if r.headers.get("x-slotserve-retried") == "1"]
    assert len(retried) == now[victim] and all(r.headers["x-slotserve-replica"] != victim for r in retried)
    assert all(r.json()["usage"]["completion_tokens"] == 440 for r in results)     # whole answers

    # and new requests keep being answered while Serve replaces the replica
    for _ in range(3):
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.headers["x-slotserve-replica"] != victim, r.text
