"""The admin CLI against an in-process controller (the HTTP call is replaced)."""

from __future__ import annotations

import asyncio
import re
import shlex
import threading
import time
from pathlib import Path

import pytest

from slotserve.cli import admin as admin_client
from slotserve.cli import main


@pytest.fixture()
def core(tmp_path, monkeypatch):
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.control import ControlError, ControllerCore

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


def test_rollout_start_bundle_overrides_the_spec(core, capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("bundle: support-bot:2\nstrategy: canary\nsteps: [10, 100]\nbake: 1s\n")
    assert main(["load", "demo:2"]) == 0
    assert main(["rollout", "start", str(spec)]) == 1  # the spec's own bundle is not in the store
    assert "support-bot" in capsys.readouterr().err
    assert main(["rollout", "start", str(spec), "--bundle", "demo:2"]) == 0
    capsys.readouterr()
    assert main(["rollout", "status"]) == 0
    assert "canary rollout of demo:2" in capsys.readouterr().out
    spec.write_text("- not a spec\n")
    assert main(["rollout", "start", str(spec), "--bundle", "demo:2"]) == 1
    assert "must hold a rollout spec" in capsys.readouterr().err


# ---------------------------------------------------------------- the README quick start

REPO = Path(__file__).resolve().parents[1]


def _quick_start_block() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return next(b for b in blocks if "slotserve rollout start" in b)


def _quick_start_commands() -> list[list[str]]:
    """The `slotserve ...` lines of the README quick start's second block, in order."""
    return [shlex.split(line, comments=True)[1:] for line in _quick_start_block().splitlines()
            if line.startswith("slotserve ")]


@pytest.fixture()
def real_served(tmp_path, monkeypatch):
    """The real app, replica and controller in this process (no Ray) on a store holding
    only the real demo as demo:1, as right after `slotserve serve`; the CLI's HTTP calls
    go to it."""
    import httpx

    from slotserve.api.auth import digest
    from slotserve.api.routes import create_app
    from slotserve.bundles.demo import REAL_DEMO_UNAVAILABLE, publish_real_demo
    from slotserve.bundles.store import Store
    from slotserve.control.controller import SlotController
    from slotserve.replica import LocalController, Replica, Settings

    monkeypatch.setenv("SLOTSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("SLOTSERVE_ADMIN_TOKEN", "qs-token")
    if publish_real_demo(Store(tmp_path), "demo") is None:
        pytest.skip(REAL_DEMO_UNAVAILABLE)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    async def start():
        ctl = SlotController(str(tmp_path), app="qs", bundle="demo:1")
        rep = Replica(Settings(store=str(tmp_path), app="qs", admin_token_sha256=digest("qs-token")),
                      LocalController(ctl), replica_id="r1")
        await rep.start()
        return rep, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)),
                                      base_url="http://test", timeout=300)

    rep, client = run(start())

    def http_call(args, method, path, body=None):
        r = run(client.request(method, path, json=body, headers={"authorization": "Bearer qs-token"}))
        return admin_client.admin_result(r, method, path)

    monkeypatch.setattr(admin_client, "call", http_call)
    try:
        yield
    finally:
        run(client.aclose())
        run(rep.stop())
        rep.mgr.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_readme_quick_start_works_as_written(real_served, tmp_path, capsys, monkeypatch):
    """The README quick start's admin commands, in order, on the real demo model: a prompt-only
    demo:2 that costs no weight bytes, promote, rollback, and a canary of demo:2 whose eval
    gate passes. The traffic loop and the drills run their own servers elsewhere
    (tests/test_first_contact.py, tests/test_drill.py)."""
    monkeypatch.chdir(REPO)  # the README's paths (examples/...) are relative to the checkout
    block = _quick_start_block()
    echo = re.search(r'^echo "(.*)" > (\S+)$', block, re.M)
    assert echo, "the quick start writes the new system prompt with echo"
    prompt = tmp_path / "concise.txt"
    prompt.write_text(echo.group(1) + "\n")
    commands = _quick_start_commands()
    assert [c[0] for c in commands] == ["bundle", "load", "state", "rollout", "rollback", "ledger",
                                        "rollout", "rollout", "rollout", "drill", "drill"]
    for argv in commands:
        if argv[0] == "drill":
            continue
        argv = [str(prompt) if a == echo.group(2) else a for a in argv]
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        if argv[:2] == ["rollout", "start"]:
            break
    out = capsys.readouterr().out
    assert "published demo:2" in out and "rollout started" in out
    assert re.search(r"candidate demo:2 on \w+: weights 0 MB", out), out   # prompt-only: shares live's weights
    assert "rolled back: live=demo:1, previous=demo:2" in out
    deadline = time.time() + 240                                          # the eval gate: 24 questions x 2
    while time.time() < deadline:
        assert main(["rollout", "status"]) == 0
        status = capsys.readouterr().out
        if "pending_eval" not in status:
            break
        time.sleep(2)
    assert "canary rollout of demo:2 (live demo:1): running, step 1/3" in status, status
    assert "eval gate passed: eval_score 1 vs live 1" in status, status
