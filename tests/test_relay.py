"""The gateway's relay without Ray (issue 14 #4): what a client sees when the replica
answering it is lost. The "replica" is the real FastAPI app of a real Replica on the tiny
demo bundle, run through serve_asgi exactly as SlotServe.http runs it; a lost replica is
the stream raising the exception a Ray handle raises (tests/test_serving_ray_crash.py
kills real replicas)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from slotserve.api import relay
from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

TOKEN = "relay-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}


class Died(Exception):
    """What the gateway's classify calls "lost" here (Ray's ActorDiedError there)."""


def classify(exc):
    return "lost" if isinstance(exc, Died) else "unavailable" if isinstance(exc, LookupError) else "error"


def test_may_retry_only_once_only_before_anything_was_sent_only_what_is_safe_twice():
    assert relay.may_retry("POST", "/v1/chat/completions", sent_anything=False, attempt=0)
    assert relay.may_retry("POST", "/v1/completions", False, 0) and relay.may_retry("GET", "/v1/models", False, 0)
    assert not relay.may_retry("POST", "/v1/chat/completions", sent_anything=True, attempt=0)
    assert not relay.may_retry("POST", "/v1/chat/completions", False, attempt=1)
    for path in ("/admin/rollback", "/admin/load", "/admin/rollout/promote", "/v1/feedback"):
        assert not relay.may_retry("POST", path, False, 0), path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two replicas (two apps) of one controller, as two Serve replicas would be."""
    root = tmp_path_factory.mktemp("relay-store")
    publish_demo(Store(root), "demo", seed=0)
    ctl = SlotController(str(root), app="relay", bundle="demo:1")
    settings = Settings(store=str(root), app="relay", admin_token_sha256=digest(TOKEN))
    loop = asyncio.new_event_loop()
    reps = [Replica(settings, LocalController(ctl), replica_id=rid) for rid in ("r1", "r2")]
    for rep in reps:
        loop.run_until_complete(rep.start())
    apps = [create_app(rep) for rep in reps]
    yield loop, apps, reps
    loop.close()


def _gateway(open_stream):
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=relay.Forwarder(open_stream, classify, 1 << 20)),
                               base_url="http://test", timeout=60)
    return client


def _dies_after(app, n_batches: int, exc=Died("replica gone")):
    """A replica that streams its first `n_batches` message batches, then dies."""
    async def stream(req):
        i = 0
        async for batch in relay.serve_asgi(app, req):
            if i == n_batches:
                raise exc
            yield batch
            i += 1
        if i <= n_batches:
            raise exc
    return stream


def test_a_request_whose_replica_dies_before_answering_is_retried_once_elsewhere(replicas):
    loop, (a, b), _ = replicas
    opened = []

    def open_stream(req):
        opened.append(req["path"])
        return _dies_after(a, 0)(req) if len(opened) == 1 else relay.serve_asgi(b, req)

    async def go():
        async with _gateway(open_stream) as c:
            return await c.post("/v1/chat/completions", json=CHAT)
    r = loop.run_until_complete(go())
    assert r.status_code == 200, r.text
    assert r.headers[relay.RETRIED_HEADER] == "1" and r.headers["x-slotserve-replica"] == "r2"
    assert r.json()["choices"][0]["message"]["content"] is not None and len(opened) == 2


def test_a_second_loss_and_an_unsafe_call_get_an_openai_error_not_a_plain_500(replicas):
    loop, (a, _), _ = replicas

    async def go():
        async with _gateway(_dies_after(a, 0)) as c:
            twice = await c.post("/v1/chat/completions", json=CHAT)
            admin = await c.post("/admin/rollback", json={"reason": "x"}, headers=AUTH)
            models = await c.get("/v1/models")
        return twice, admin, models
    twice, admin, models = loop.run_until_complete(go())
    for r in (twice, admin, models):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        err = r.json()["error"]
        assert err["code"] == "replica_unavailable" and "Died" in err["message"]
    assert "so did the one it was retried on" in twice.json()["error"]["message"]
    assert "may or may not have been applied" in admin.json()["error"]["message"]   # never run twice


def test_a_stream_cut_mid_answer_ends_with_an_error_event(replicas):
    loop, (a, _), _ = replicas
    body = {**CHAT, "stream": True, "max_tokens": 12}

    async def go():
        async with _gateway(_dies_after(a, 3)) as c:
            return await c.post("/v1/chat/completions", json=body)
    r = loop.run_until_complete(go())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e[6:] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and relay.RETRIED_HEADER not in r.headers
    assert json.loads(events[-2])["error"]["code"] == "replica_unavailable"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"    # what was sent stays sent


def test_other_failures_are_error_objects_and_4xx_pass_through_untouched(replicas):
    loop, (a, _), _ = replicas

    async def none_up(req):
        raise LookupError("no replica")
        yield

    async def go():
        async with _gateway(lambda req: relay.serve_asgi(a, req)) as c:
            bad = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": "8"})
            big = await c.post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        async with _gateway(none_up) as c:
            down = await c.post("/v1/chat/completions", json=CHAT)
        return bad, big, down
    bad, big, down = loop.run_until_complete(go())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert bad.headers["x-slotserve-replica"] == "r1"
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    assert down.status_code == 503 and down.json()["error"]["code"] == "not_ready"


def test_a_client_that_leaves_cancels_the_replica_stream(replicas):
    """The gateway's request task is cancelled when its client leaves (Serve does that);
    closing the replica stream must end the engine request, not let it decode on."""
    loop, (a, _), (rep, _) = replicas
    eos = rep.mgr.slot("live").engine.eos_token_ids
    body = {"model": "demo", "prompt": "a", "max_tokens": 200, "stream": True,
            "logit_bias": {str(t): -100 for t in eos}}
    req = {"method": "POST", "path": "/v1/completions", "raw_path": None, "root_path": "", "query_string": b"",
           "headers": [(b"content-type", b"application/json")], "client": None, "scheme": "http",
           "http_version": "1.1", "body": json.dumps(body).encode()}
    sent, inflight = [], []

    async def go():
        stream = relay.serve_asgi(a, req)
        async for batch in stream:
            sent.extend(batch)
            inflight.append(rep.handler.inflight)
            if len(sent) >= 4:
                break
        await stream.aclose()
        for _ in range(100):
            if rep.handler.inflight == 0:
                break
            await asyncio.sleep(0.05)
    loop.run_until_complete(go())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200, sent
    assert inflight[-1] == 1 and rep.handler.inflight == 0


def test_a_replica_lost_after_its_answer_was_whole_changes_nothing(replicas):
    """The replica's last body message can reach the client before its stream's end does;
    losing the replica in between must not send anything more (a second final body
    breaks the HTTP/1.1 connection, and with it the client's next request on it)."""
    loop, (a, _), _ = replicas
    sent = []

    async def go():
        async def whole_then_dies(req):
            async for batch in relay.serve_asgi(a, req):
                yield batch
            raise Died("gone after answering")

        async def send(msg):
            sent.append(msg)
        req = {"method": "POST", "path": "/v1/chat/completions", "raw_path": None, "root_path": "",
               "query_string": b"", "headers": [(b"content-type", b"application/json")], "client": None,
               "scheme": "http", "http_version": "1.1", "body": json.dumps(CHAT).encode()}
        return await relay.relay(whole_then_dies, req, send, classify)
    assert loop.run_until_complete(go()) == 0
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["status"] == 200 and [m.get("more_body", False) for m in bodies][-1] is False
    assert sum(not m.get("more_body", False) for m in bodies) == 1, sent
    assert json.loads(b"".join(m.get("body", b"") for m in bodies))["object"] == "chat.completion"
