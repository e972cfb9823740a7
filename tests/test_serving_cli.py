"""The admin CLI against an in-process controller (the HTTP call is replaced)."""

from __future__ import annotations

import pytest

from slotserve import admin_client
from slotserve.cli import main


@pytest.fixture()
def core(tmp_path, monkeypatch):
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.controller import ControlError, ControllerCore

    store = Store(tmp_path)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    c = ControllerCore(store, app="cli", bundle="demo:1")
    c.report("r1", {"applied": c.state.version, "ready": True,
                    "slots": {"slots": {"live": {"ref": "demo:1", "tier": "device"}}}})

    def fake_call(args, method, path, body=None):
        ops = {"/admin/load": lambda: c.load(body["bundle"], actor="cli"),
               "/admin/rollout/promote": lambda: c.promote(actor="cli", reason=body["reason"]),
               "/admin/rollback": lambda: c.rollback(actor="cli", reason=body["reason"]),
               "/admin/rollout/abort": lambda: c.abort(actor="cli", reason=body["reason"]),
               "/admin/rollout": lambda: c.start_rollout(body, actor="cli")}
        if method == "GET":
            return c.admin_state() if path == "/admin/state" else c.rollout_status()
        try:
            st = ops[path]()
        except ControlError as exc:
            raise admin_client.AdminError(f"HTTP {exc.status}: {exc.message}") from None
        return {"state": c.admin_state(), "version": st.version, "converged": True, "converge_ms": 1.0,
                "replicas": 1}

    monkeypatch.setattr(admin_client, "call", fake_call)
    return c


def test_cli_load_promote_rollback_state(core, capsys, tmp_path):
    assert main(["load", "demo:2"]) == 0
    assert "candidate=demo:2" in capsys.readouterr().out
    assert main(["rollout", "promote", "--reason", "ok"]) == 0
    assert "live=demo:2, previous=demo:1" in capsys.readouterr().out
    assert main(["rollback", "--reason", "drill"]) == 0
    out = capsys.readouterr().out
    assert "live=demo:1, previous=demo:2" in out and "converged on 1 replica(s)" in out
    assert main(["state"]) == 0
    out = capsys.readouterr().out
    assert "live      demo:1" in out and "replica r1" in out
    assert main(["state", "--json"]) == 0
    assert '"desired"' in capsys.readouterr().out


def test_cli_rollout_status_and_errors(core, capsys, tmp_path):
    assert main(["rollout", "status"]) == 0
    assert "no rollout" in capsys.readouterr().out
    spec = tmp_path / "spec.yaml"
    spec.write_text("bundle: demo:2\nstrategy: canary\nsteps: [10, 100]\nbake: 1s\nmin_requests: 5\n"
                    "guards:\n  - {metric: error_rate, op: '>', value: 0.1, action: rollback}\n")
    assert main(["rollout", "start", str(spec)]) == 1  # not staged: one-line error, exit 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["load", "demo:2"]) == 0
    assert main(["rollout", "start", str(spec)]) == 0
    capsys.readouterr()
    assert main(["rollout", "status"]) == 0
    out = capsys.readouterr().out
    assert "canary rollout of demo:2" in out and "step 1/2" in out and "error_rate" in out
    assert main(["rollout", "abort", "--reason", "no"]) == 0
    assert main(["rollback"]) == 1  # nothing to roll back to
    assert "nothing to roll back to" in capsys.readouterr().err
