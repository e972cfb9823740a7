"""The controller's pure decisions (`slotserve.control.transitions`): an operation on a desired
state -> the fields to change and the ledger rows, or a refusal that says what to do."""

from __future__ import annotations

import pytest

from slotserve.control import transitions as tr
from slotserve.control import DesiredState, SlotRef
from slotserve.rollout import machine as ro
from slotserve.rollout.spec import RolloutSpec

ONE, TWO, THREE = (SlotRef(f"demo:{i}", f"sha256:{i}") for i in (1, 2, 3))
NO_CANDIDATE = {"candidate": None, "weights": {"live": 100.0}, "mirror_fraction": 0.0, "evict_previous": False}


def test_seed_only_fills_an_empty_live_unless_forced():
    t = tr.seed(DesiredState(), ONE, "demo:1", force=False)
    assert t.changes == {"live": ONE} and t.ledger[0].action == "load"
    assert tr.seed(DesiredState(live=ONE), TWO, "demo:2", force=False) is None
    assert tr.seed(DesiredState(live=ONE), ONE, "demo:1", force=True) is None
    t = tr.seed(DesiredState(live=ONE, candidate=TWO), TWO, "demo:2", force=True)
    assert t.changes == {"live": TWO, "previous": ONE, "candidate": None}   # no longer a candidate
    assert (t.ledger[0].action, t.ledger[0].from_) == ("promote", "demo:1")


def test_load_stages_and_evicting_previous_stops_advertising_it():
    s = DesiredState(live=TWO, previous=ONE, weights={"live": 90.0, "candidate": 10.0})
    t = tr.load(s, THREE, actor="a")
    assert t.changes["candidate"] == THREE and t.changes["weights"] == {"live": 100.0}
    assert "previous" not in t.changes and [r.action for r in t.ledger] == ["load"]
    t = tr.load(s, THREE, actor="a", evict_previous=True)
    assert t.changes["previous"] is None and [r.action for r in t.ledger] == ["load", "evict"]
    with pytest.raises(tr.ControlError) as ei:
        tr.load(s, TWO, actor="a")
    assert (ei.value.status, ei.value.code) == (409, "already_live")


def test_promote_and_release_drop_the_candidate():
    s = DesiredState(live=TWO, previous=ONE, candidate=THREE, evict_previous=True, window_epoch=4)
    t = tr.promote(s, "ok")
    assert (t.changes["live"], t.changes["previous"], t.changes["window_epoch"]) == (THREE, TWO, 5)
    assert {k: t.changes[k] for k in NO_CANDIDATE} == NO_CANDIDATE
    assert tr.release(s, "no").changes == NO_CANDIDATE
    for op in (lambda st: tr.promote(st, ""), lambda st: tr.release(st, "")):
        with pytest.raises(tr.ControlError) as ei:
            op(DesiredState(live=TWO))
        assert ei.value.status == 409


def test_rollout_events_map_to_one_change_each():
    spec = RolloutSpec.parse({"bundle": "demo:3", "steps": [10, 100], "bake": "1s", "min_requests": 0})
    r = ro.start(spec, 0.0, live="demo:2")
    s = DesiredState(live=TWO, previous=ONE, candidate=THREE, weights=dict(r.weights), window_epoch=1)
    r, (ev,) = ro.promote(r, 1.0, "by hand")
    t = tr.rollout_event(ev, r, s)
    assert (t.changes["live"], t.changes["previous"], t.changes["rollout_phase"]) == (THREE, TWO, "promoted")
    assert [row.action for row in t.ledger] == ["promote"]
    r2, (ab,) = ro.abort(ro.start(spec, 0.0, live="demo:2"), "stop", 1.0)
    t = tr.rollout_event(ab, r2, s)
    assert {k: t.changes[k] for k in NO_CANDIDATE} == NO_CANDIDATE and t.changes["rollout_phase"] == "aborted"
    assert t.ledger[0].metrics == {"trigger": "manual"}
    r3, (ab,) = ro.abort(ro.start(spec, 0.0, live="demo:2"), "eval gate failed: no items", 1.0, trigger="eval")
    assert tr.rollout_event(ab, r3, s).ledger[0].metrics == {"trigger": "eval"}   # nobody aborted it by hand
    assert tr.rollout_event(ro.EvalGated(True, 1.0, 1.0, "ok", 0.0), r, s) is None


def test_resume_is_persisted(tmp_path):
    """An acknowledged alert stays acknowledged across a controller restart."""
    from slotserve.bundles.demo import publish_demo
    from slotserve.bundles.store import Store
    from slotserve.control import ControllerCore
    from slotserve.rollout.window import RequestOutcome

    store = Store(tmp_path)
    publish_demo(store, "demo", seed=0)
    publish_demo(store, "demo", seed=1)
    c = ControllerCore(store, app="resume", bundle="demo:1")
    c.load("demo:2", actor="t")
    c.start_rollout({"bundle": "demo:2", "steps": [50, 100], "bake": "1h", "min_requests": 0,
                     "guards": [{"metric": "error_rate", "op": ">", "value": 0.1, "action": "alert",
                                 "min_samples": 1}]}, actor="t")
    c.windows.record(RequestOutcome(slot="candidate", bundle="demo:2", latency_ms=1.0, ok=False))
    c.tick()
    assert c.rollout.paused
    c.resume(actor="t")
    assert not ControllerCore(store, app="resume").rollout.paused
