"""GET /admin/rollout carries the server's clock (`now`), so a client can tell how long
a step has run without trusting its own; `slotserve rollout status` prints it."""

from __future__ import annotations

from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.cli import admin as admin_client
from slotserve.cli import main
from slotserve.control import ControllerCore


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rollout_status_has_the_servers_now(tmp_path, monkeypatch, capsys):
    store = Store(tmp_path)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    clock = Clock(1_000.0)     # far from this machine's time.time(): the client must not use its own
    c = ControllerCore(store, app="status", bundle="demo:1", clock=clock)
    assert c.rollout_status() == {"phase": None, "candidate": None, "weights": {"live": 100.0},
                                  "now": 1_000.0}
    c.load("demo:2", actor="t")
    c.start_rollout({"bundle": "demo:2", "steps": [10, 100], "bake": "1m", "min_requests": 5}, actor="t")
    clock.t += 12.5
    st = c.rollout_status()
    assert st["now"] == 1_012.5 and st["step_started_at"] == 1_000.0
    assert st["time_to_next_step_s"] == 47.5

    monkeypatch.setattr(admin_client, "call", lambda args, method, path, body=None: c.rollout_status())
    assert main(["rollout", "status"]) == 0
    assert "step running 12.5s" in capsys.readouterr().out


def test_rollout_status_live_is_what_serves_now(tmp_path):
    """After a promote the status says the candidate is live; the rollout's starting live
    stays visible as `baseline` (review finding: it kept saying live = the old bundle)."""
    store = Store(tmp_path)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    c = ControllerCore(store, app="status2", bundle="demo:1", clock=Clock(5.0))
    c.load("demo:2", actor="t")
    c.start_rollout({"bundle": "demo:2", "steps": [10, 100], "bake": "1m", "min_requests": 5}, actor="t")
    st = c.rollout_status()
    assert (st["live"], st["baseline"]) == ("demo:1", "demo:1")
    c.promote(actor="t")
    st = c.rollout_status()
    assert st["phase"] == "promoted" and (st["live"], st["baseline"]) == ("demo:2", "demo:1")
