"""/health, /version, /tokenize and /detokenize on the real app and replica (no Ray), as a
client calls them, with the bad-input table."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from slotserve import __version__


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app, replica and controller in this process; demo:1 live."""
    from slotserve.api.auth import digest
    from slotserve.api.routes import create_app
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.control.controller import SlotController
    from slotserve.replica import LocalController, Replica, Settings

    root = tmp_path_factory.mktemp("small-endpoints")
    publish_demo(Store(root), "demo", seed=0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    async def start():
        ctl = SlotController(str(root), app="small", bundle="demo:1")
        rep = Replica(Settings(store=str(root), app="small", admin_token_sha256=digest("tok")),
                      LocalController(ctl), replica_id="r1")
        await rep.start()
        return ctl, rep, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)),
                                           base_url="http://test", timeout=300)

    ctl, rep, client = run(start())

    class App:
        replica = rep

        def get(self, path, **kw):
            return run(client.get(path, **kw))

        def post(self, path, body=None, **kw):
            return run(client.post(path, json=body, **kw))

    try:
        yield App()
    finally:
        run(client.aclose())
        run(rep.stop())
        ctl.stop()
        rep.mgr.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_health_is_liveness_without_token_or_model(app):
    r = app.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "replica": "r1"}
    # alive is not ready: /health stays 200 while /healthz says 503 (a replica loading)
    rep = app.replica
    saved = rep.desired, rep._latest
    rep.desired = rep._latest = None          # as before the controller's first answer
    try:
        assert app.get("/healthz").status_code == 503
        assert app.get("/health").status_code == 200
    finally:
        rep.desired, rep._latest = saved


def test_version_names_slotserve_and_the_live_bundle(app):
    body = app.get("/version").json()
    assert body["version"] == __version__
    assert body["live"] == "demo:1" and body["digest"].startswith("sha256:")


def test_tokenize_a_prompt_as_completions_do(app):
    view = app.replica.backend.views()["live"]
    r = app.post("/tokenize", {"model": "demo", "prompt": "once upon a time"})
    assert r.status_code == 200 and r.headers["x-slotserve-bundle"] == "demo:1"
    body = r.json()
    assert body["tokens"] == view.encode("once upon a time")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == view.max_model_len > 0
    assert body["model"] == "demo:1"
    # the count agrees with what a completion reports for the same prompt
    c = app.post("/v1/completions", {"model": "demo", "prompt": "once upon a time", "max_tokens": 1}).json()
    assert c["usage"]["prompt_tokens"] == body["count"]
    bare = app.post("/tokenize", {"model": "demo:1", "prompt": "once upon a time",
                                  "add_special_tokens": False}).json()
    assert bare["tokens"] == view.tokenizer("once upon a time", add_special_tokens=False)["input_ids"]


def test_tokenize_messages_with_the_bundles_chat_template(app):
    messages = [{"role": "user", "content": "hello there"}]
    with_prompt = app.post("/tokenize", {"model": "demo", "messages": messages}).json()
    chat = app.post("/v1/chat/completions", {"model": "demo", "messages": messages, "max_tokens": 1}).json()
    assert with_prompt["count"] == chat["usage"]["prompt_tokens"]
    without = app.post("/tokenize", {"model": "demo", "messages": messages,
                                     "add_generation_prompt": False}).json()
    assert 0 < without["count"] < with_prompt["count"]
    assert with_prompt["tokens"][:without["count"]] == without["tokens"]


def test_detokenize_round_trips(app):
    toks = app.post("/tokenize", {"model": "demo", "prompt": "the cat sat", "add_special_tokens": False}).json()
    r = app.post("/detokenize", {"model": "demo", "tokens": toks["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "the cat sat", "model": "demo:1"}
    assert app.post("/detokenize", {"model": "demo:1", "tokens": []}).json()["prompt"] == ""


BAD = [
    ("/tokenize", {"prompt": "x"}, 400, "model"),
    ("/tokenize", {"model": "demo"}, 400, "prompt"),
    ("/tokenize", {"model": "demo", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
     "messages"),
    ("/tokenize", {"model": "demo", "prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "demo", "prompt": "x", "return_token_strs": True}, 400, "return_token_strs"),
    ("/tokenize", {"model": "demo", "messages": []}, 400, "messages"),
    ("/tokenize", {"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/tokenize", {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                   "add_special_tokens": True}, 400, "add_special_tokens"),
    ("/tokenize", {"model": "gpt-4o", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": "demo"}, 400, "tokens"),
    ("/detokenize", {"model": "demo", "tokens": [1, -2]}, 400, "tokens.1"),
    ("/detokenize", {"model": "demo", "tokens": ["1"]}, 400, "tokens.0"),
    ("/detokenize", {"model": "demo", "tokens": [True]}, 400, "tokens.0"),
    ("/detokenize", {"model": "demo", "tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"model": "demo", "tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"model": "nope:3", "tokens": [1]}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p}-{i}" for i, (p, *_r) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(app, path, body, status, param):
    r = app.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_non_json_bodies_are_400(app):
    for path in ("/tokenize", "/detokenize"):
        r = app.post(path, content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        assert app.post(path, [1, 2]).status_code == 400
    assert app.get("/health").status_code == 200   # nothing serving was disturbed
