"""A replica killed under load on real Ray Serve (issue 14 #4): the Gateway retries every
request that had received nothing yet on the other replica, and a stream cut mid-answer
ends with an OpenAI error event, never Ray's plain-text 500. Two replicas on 127.0.0.1
serve the tiny demo bundle with a 2 s injected latency (slots/faults.py), so requests are
surely in flight, with nothing sent, when the replica dies; one Ray start for the module."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

APP = "slotserve-crash"
LATENCY_MS = 2000


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
    from slotserve.drill.config import publish_faulty

    root = tmp_path_factory.mktemp("ray-crash-store")
    store = Store(root)
    publish_demo(store, "demo", seed=0)
    slow = publish_faulty(store, "demo:1", {"latency_ms": LATENCY_MS})
    eos = json.loads((store.path_of("demo", 1) / "model" / "config.json").read_text())["eos_token_id"]
    port = _free_port()
    start_local_ray(root / "run", num_cpus=2, include_dashboard=False, namespace=APP,
                    logging_level="ERROR", log_to_driver=False,
                    runtime_env={"env_vars": {"SLOTSERVE_HOME": str(root)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"store": str(root), "bundle": slow, "app": APP, "num_replicas": 2}),
                  name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "eos": eos if isinstance(eos, list) else [eos]}
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


def test_a_killed_replica_loses_no_request_that_had_not_started_answering(server):
    url = server["url"]
    # long answers (end of sequence banned), so every request is still running at the kill
    body = {"model": "demo", "messages": [{"role": "user", "content": "count"}], "max_tokens": 440,
            "temperature": 1.0, "logit_bias": {str(t): -100 for t in server["eos"]}}
    assert httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=120).status_code == 200

    results: list[httpx.Response | BaseException] = []

    def one():
        try:
            results.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=300))
        except BaseException as exc:              # noqa: BLE001 (reported below)
            results.append(exc)
    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:                             # each waits 2 s on its replica, then decodes
        t.start()
    with httpx.Client(timeout=300) as c, c.stream("POST", url + "/v1/chat/completions",
                                                  json={**body, "stream": True}) as stream:
        assert stream.status_code == 200, stream.read()
        victim = stream.headers["x-slotserve-replica"]
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
        assert not results, "the twelve should still be running"
        _kill(victim)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    for t in threads:
        t.join()

    # the stream had begun: it cannot move, so it ends with an error event, then [DONE]
    assert events[-1] == "[DONE]", events[-3:]
    err = json.loads(events[-2])["error"]
    assert err["code"] == "replica_unavailable" and "ActorDiedError" in err["message"], err

    # the twelve had sent nothing back yet: every one is answered, those on the victim by the other
    assert all(isinstance(r, httpx.Response) for r in results), results
    assert [r.status_code for r in results] == [200] * 12, [r.text[:200] for r in results if r.status_code != 200]
    retried = [r for r in results if r.headers.get("x-slotserve-retried") == "1"]
    assert retried, "no request was running on the killed replica"
    assert all(r.headers["x-slotserve-replica"] != victim for r in retried)
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in results)

    # and new requests keep being answered while Serve replaces the replica
    for _ in range(4):
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.headers["x-slotserve-replica"] != victim, r.text


def _count(url: str, status: str) -> float:
    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("slotserve_requests_total{") and f'status="{status}"' in line)


def test_a_client_that_leaves_a_stream_frees_its_replica(server):
    """Serve cancels the Gateway's request when its client disconnects; the Gateway must
    pass that on, or the replica decodes all 440 tokens for nobody and counts it ok."""
    url = server["url"]
    body = {"model": "demo", "messages": [{"role": "user", "content": "count"}], "max_tokens": 440,
            "temperature": 1.0, "logit_bias": {str(t): -100 for t in server["eos"]}, "stream": True}
    before = _count(url, "cancelled")
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
    t0 = time.time()
    while _count(url, "cancelled") == before and time.time() - t0 < 30:
        time.sleep(0.5)
    assert _count(url, "cancelled") == before + 1
