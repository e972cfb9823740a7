"""Inputs that used to answer 500 answer a 4xx OpenAI error object (issue 14 #5), on the
whole HTTP surface in one process (app + replica + controller + real engines, no Ray):
deeply nested JSON, a version too large for the registry, a bundle that fails its
digest verification on /admin/load. Nothing serving is disturbed and nothing is logged
as an unhandled error."""

from __future__ import annotations

import asyncio
import logging
import os

import httpx
import pytest

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

TOKEN = "errors-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(tmp_path_factory.mktemp("errors-store"))
    for seed in (0, 1):
        publish_demo(st, "demo", seed=seed)
    return st


def _run(store, app: str, body):
    async def go():
        ctl = SlotController(str(store.root), app=app, bundle="demo:1")
        rep = Replica(Settings(store=str(store.root), app=app, admin_token_sha256=digest(TOKEN),
                               report_interval_s=0.05), LocalController(ctl), replica_id="r1")
        await rep.start()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://t", timeout=60)
        try:
            await body(c, ctl)
            r = await c.post("/v1/chat/completions", json=CHAT)           # still serving
            assert r.status_code == 200, r.text
        finally:
            await c.aclose()
            await rep.stop()
            rep.mgr.close()
            ctl.stop()
    asyncio.run(go())


def _is_openai_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    return err


def test_deeply_nested_json_is_a_400_without_a_traceback(store, caplog):
    async def body(c, ctl):
        for raw in (b"[" * 1000 + b"]" * 1000,                               # the parser recurses
                    b'{"model": "demo", "messages": ' + b"[" * 200 + b"]" * 200 + b"}",
                    b'{"model": "demo", "messages": [{"role": "user", "content": '
                    + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"}]}"):
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/feedback"):
                err = _is_openai_error(await c.post(path, content=raw,
                                                    headers={"content-type": "application/json"}), 400)
                assert "levels deep" in err["message"]
            err = _is_openai_error(await c.post("/admin/load", content=raw, headers=AUTH), 400)
        ok = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
              "metadata": {"a": {"b": {"c": [1, [2]]}}}}
        assert (await c.post("/v1/chat/completions", json=ok)).status_code != 500

    with caplog.at_level(logging.ERROR):
        _run(store, "errors-deep", body)
    assert not [r for r in caplog.records if r.exc_info], "an unhandled error was logged"


def test_a_version_too_large_is_a_400_naming_the_field(store):
    async def body(c, ctl):
        v = ctl.core.state.version
        for ref in ("demo:99999999999999999999999", "demo:" + "9" * 5000, "demo:9223372036854775808", "demo:0"):
            err = _is_openai_error(await c.post("/admin/load", json={"bundle": ref}, headers=AUTH), 400)
            assert err["param"] == "bundle" and "between 1 and" in err["message"]
        err = _is_openai_error(await c.post("/admin/load", json={"bundle": "demo:9223372036854775807"},
                                            headers=AUTH), 404)
        assert ctl.core.state.version == v

    _run(store, "errors-overflow", body)


def test_a_bundle_failing_verification_on_load_is_a_422(store):
    weights = store.path_of("demo", 2) / "model" / "model.safetensors"

    async def body(c, ctl):
        os.chmod(weights, 0o644)
        with open(weights, "r+b") as f:
            f.seek(4096)
            b = f.read(1)
            f.seek(4096)
            f.write(bytes([b[0] ^ 0xFF]))
        try:
            err = _is_openai_error(await c.post("/admin/load", json={"bundle": "demo:2"}, headers=AUTH), 422)
            assert "failed verification" in err["message"] and err["code"] == "load_failed"
            st = (await c.get("/admin/state", headers=AUTH)).json()
            assert st["desired"]["candidate"] is None and st["desired"]["live"]["ref"] == "demo:1"
        finally:
            with open(weights, "r+b") as f:
                f.seek(4096)
                f.write(b)

    _run(store, "errors-verify", body)
