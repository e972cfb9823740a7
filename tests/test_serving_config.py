"""The example Serve config, the app builder, the admin token file and the controller core."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from slotserve.api.auth import TokenCheck, digest, ensure_token, read_token

REPO = Path(__file__).resolve().parents[1]


def test_example_serve_config_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from slotserve.app import build_app
    cfg = yaml.safe_load((REPO / "examples" / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app = schema.applications[0]
    assert app.import_path == "slotserve.app:build_app"
    build_app(dict(app.args))  # binds without Ray running
    with pytest.raises(ValueError, match="unknown setting"):
        build_app({"bundel": "x"})


def test_admin_token_file_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv("SLOTSERVE_ADMIN_TOKEN", raising=False)
    token, where = ensure_token(tmp_path)
    path = tmp_path / "admin_token"
    assert where == str(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_token(tmp_path)[0] == token == read_token(tmp_path)
    check = TokenCheck(None, tmp_path)
    assert check.check(f"Bearer {token}") is None
    assert "invalid" in check.check("Bearer nope")
    assert "missing" in check.check(None)
    assert "malformed" in check.check(token)
    monkeypatch.setenv("SLOTSERVE_ADMIN_TOKEN", "from-env")
    assert ensure_token(tmp_path) == ("from-env", "$SLOTSERVE_ADMIN_TOKEN")
    assert TokenCheck(digest("x")).check("Bearer x") is None


def test_controller_state_survives_restart_and_refuses_bad_ops(tmp_path):
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.control import ControlError, ControllerCore

    store = Store(tmp_path)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    c = ControllerCore(store, app="t", bundle="demo:1")
    assert c.state.live.ref == "demo:1"
    with pytest.raises(ControlError) as ei:
        c.rollback(actor="t")
    assert ei.value.status == 409
    with pytest.raises(ControlError) as ei:
        c.load("demo:9", actor="t")
    assert ei.value.status == 404 and "published versions" in ei.value.message
    with pytest.raises(ControlError):
        c.load("demo:1", actor="t")  # already live
    c.load("demo:2", actor="t")
    with pytest.raises(ControlError) as ei:
        c.start_rollout({"bundle": "demo:2", "strategy": "canary", "steps": [50, 10]}, actor="t")
    assert ei.value.status == 400 and "increasing" in ei.value.message
    c.promote(actor="t")
    assert (c.state.live.ref, c.state.previous.ref) == ("demo:2", "demo:1")
    assert store.registry.get_alias("demo", "live") == 2

    again = ControllerCore(store, app="t", bundle=None)  # a restart of the whole app
    assert (again.state.live.ref, again.state.previous.ref, again.state.candidate) == ("demo:2", "demo:1", None)
    assert again.state.version > c.state.version
    again.rollback(actor="t", reason="drill")
    assert again.state.live.ref == "demo:1"
    assert again.ledger(5)[0]["action"] in ("alias", "rollback")
