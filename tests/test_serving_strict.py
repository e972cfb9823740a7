"""The strict request edge (issues 14 item 8 and 17): unknown fields and loose JSON types are
refused with a 400 whose `param` names the field; a body that is not JSON is a 415; tool_choice
without tools is refused. Through the real app (in process, the tiny demo bundle)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

MSGS = [{"role": "user", "content": "hi"}]
CASES = [  # (extra body fields, the param named)
    ({"repetiton_penalty": 1.1}, "repetiton_penalty"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"n": 1.5}, "n"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),          # outside the demo's vocabulary
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),      # the demo template does not read it
    ({"reasoning_effort": "max"}, "reasoning_effort"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format.json_schema.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    publish_demo(Store(root), "demo", seed=0)
    loop = asyncio.new_event_loop()
    ctl = SlotController(str(root), app="local", bundle="demo:1")
    rep = Replica(Settings(store=str(root), app="local", admin_token_sha256=digest("t")),
                  LocalController(ctl), replica_id="r1")
    loop.run_until_complete(rep.start())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://test",
                               timeout=60)
    yield loop, client
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(rep.stop())
    loop.close()


@pytest.mark.parametrize("extra, param", CASES)
def test_refusal_names_the_field(app_client, extra, param):
    loop, c = app_client
    r = loop.run_until_complete(c.post("/v1/chat/completions", json={"model": "demo", "messages": MSGS, **extra}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert err["message"]


def test_completion_fields(app_client):
    loop, c = app_client
    for extra, param in (({"max_tokens": 0}, "max_tokens"), ({"suffix": "x"}, "suffix"),
                         ({"best_of": 3}, "best_of"), ({"logprobs": True}, "logprobs")):
        r = loop.run_until_complete(c.post("/v1/completions", json={"model": "demo", "prompt": "a", **extra}))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = loop.run_until_complete(c.post("/v1/completions", json={"model": "demo", "prompt": "once", "echo": True,
                                                               "max_tokens": 3, "logprobs": None, "n": 2}))
    body = r.json()
    assert r.status_code == 200 and [ch["index"] for ch in body["choices"]] == [0, 1], r.text
    assert all(ch["text"].startswith("once") for ch in body["choices"])


def test_not_json_is_refused(app_client):
    loop, c = app_client
    r = loop.run_until_complete(c.post("/v1/chat/completions", content=b'{"model": "demo"}',
                                       headers={"content-type": "text/plain"}))
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = loop.run_until_complete(c.post("/v1/chat/completions", data={"model": "demo"}))   # a form, like curl -d
    assert r.status_code == 415


def test_new_fields_are_honoured_not_refused(app_client):
    loop, c = app_client
    r = loop.run_until_complete(c.post("/v1/chat/completions", json={
        "model": "demo", "messages": MSGS, "max_tokens": 4, "temperature": 0, "presence_penalty": 1,
        "frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_p": 0.1, "logit_bias": {"5": -100},
        "logprobs": True, "top_logprobs": 2, "chat_template_kwargs": {"enable_thinking": False},
        "parallel_tool_calls": False, "n": 2, "seed": 3}))
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2 and all(len(ch["logprobs"]["content"]) >= 1 for ch in choices)
    assert all(len(t["top_logprobs"]) == 2 for ch in choices for t in ch["logprobs"]["content"])
