"""A manual rollback (`slotserve rollback`, POST /admin/rollback) driven on the controller
core directly (no server, no Ray): previous -> live, and whatever candidate was staged
or rolling out is released from the desired state, in one change, like an automatic
rollback releases it; a rollback that cannot happen changes nothing."""

from __future__ import annotations

import pytest

from slotserve.bundles.demo import publish_demo
from slotserve.bundles.store import Store
from slotserve.control import ControlError, ControllerCore
from slotserve.control import DesiredState, SlotRef

SPEC = {"bundle": "demo:3", "strategy": "canary", "steps": [50, 100], "bake": "1h", "min_requests": 1,
        "guards": [{"metric": "error_rate", "op": ">", "value": 0.5, "action": "rollback"}]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("rollback-store"))
    for seed in range(3):
        publish_demo(s, "demo", seed=seed)                  # demo:1, demo:2, demo:3
    return s


@pytest.fixture()
def core(store, request):
    """live demo:2, previous demo:1 (warm), nothing staged; an app of its own per test."""
    c = ControllerCore(store, app=request.node.name, bundle="demo:1")
    c.load("demo:2", actor="t")
    c.promote(actor="t")
    assert (c.state.live.ref, c.state.previous.ref, c.state.candidate) == ("demo:2", "demo:1", None)
    return c


def _released(s: DesiredState) -> tuple:
    return s.candidate, s.weights, s.mirror_fraction, s.evict_previous


def test_rollback_releases_a_staged_candidate(core, store):
    core.load("demo:3", actor="t")
    core.rollback(actor="op", reason="demo:2 is bad")
    s = core.state
    assert (s.live.ref, s.previous.ref) == ("demo:1", "demo:2")
    assert _released(s) == (None, {"live": 100.0}, 0.0, False)
    rows = [e for e in core.ledger(10, "demo:3") if e["action"] != "alias"]
    assert rows[0]["action"] == "abort" and "released by rollback to demo:1" in rows[0]["reason"]
    assert rows[0]["actor"] == "op"
    assert store.registry.aliases().get("demo", {}).get("candidate") is None
    # a restarted controller (and every replica reconciling to it) has nothing to stage
    again = ControllerCore(store, app=core.app)
    assert again.state.candidate is None and again.state.live.ref == "demo:1"


def test_rollback_during_a_rollout_aborts_it_in_the_same_change(core):
    core.load("demo:3", actor="t")
    core.start_rollout(SPEC, actor="t")
    assert core.state.weights == {"live": 50.0, "candidate": 50.0}
    v = core.state.version
    core.rollback(actor="op", reason="pulling demo:3")
    s = core.state
    assert s.version == v + 1        # one change: no replica sees a half-done rollback
    assert (s.live.ref, s.previous.ref) == ("demo:1", "demo:2")
    assert _released(s) == (None, {"live": 100.0}, 0.0, False)
    assert core.rollout.phase == "aborted" == s.rollout_phase
    assert "rollback" in core.rollout.reason
    acts = [(e["action"], e["bundle"]) for e in core.ledger(10) if e["action"] != "alias"]
    assert acts[:2] == [("rollback", "demo:1"), ("abort", "demo:3")]
    assert core.rollout_status()["phase"] == "aborted"


def test_rollback_with_nothing_to_roll_back_to_changes_nothing(store, request):
    c = ControllerCore(store, app=request.node.name, bundle="demo:1")
    c.load("demo:3", actor="t")
    before, n_rows = c.state, len(c.ledger(100))
    with pytest.raises(ControlError) as ei:
        c.rollback(actor="op")
    assert ei.value.status == 409 and "rollout abort" in ei.value.message
    assert c.state == before
    assert len(c.ledger(100)) == n_rows


def test_rollback_during_a_rollout_with_no_previous_aborts_to_the_baseline(store, request):
    """Issue 14 #10: the candidate carries 100%, not promoted, nothing warm as previous: a
    rollback brings the baseline live back (aborting the rollout) instead of a 409."""
    c = ControllerCore(store, app=request.node.name, bundle="demo:1")
    c.load("demo:3", actor="t")
    c.start_rollout({**SPEC, "steps": [100]}, actor="t")
    assert c.state.weights == {"live": 0.0, "candidate": 100.0} and c.state.previous is None
    v = c.state.version
    c.rollback(actor="op", reason="demo:3 answers badly")
    s = c.state
    assert s.version == v + 1
    assert (s.live.ref, s.previous) == ("demo:1", None)
    assert _released(s) == (None, {"live": 100.0}, 0.0, False)
    assert c.rollout.phase == "aborted" == s.rollout_phase
    assert "aborted" in s.reason and "baseline demo:1" in s.reason      # what the API answers with
    row = [e for e in c.ledger(10) if e["action"] != "alias"][0]
    assert (row["action"], row["bundle"], row["to_ref"], row["actor"]) == ("abort", "demo:3", "demo:1", "op")
    assert "no previous warm" in row["reason"] and "baseline demo:1" in row["reason"]


def test_manual_and_automatic_rollback_release_the_candidate_alike(core, store, request):
    core.load("demo:3", actor="t")
    core.start_rollout(SPEC, actor="t")
    core.report("r1", {"applied": core.state.version},
                [{"kind": "oom", "phase": "serve", "released": True, "slot": "candidate"}])
    auto = core.state
    assert core.rollout.phase == "rolled_back"

    manual = ControllerCore(store, app=request.node.name + "-manual", bundle="demo:1")
    manual.load("demo:2", actor="t")
    manual.promote(actor="t")
    manual.load("demo:3", actor="t")
    manual.start_rollout(SPEC, actor="t")
    manual.rollback(actor="op")
    assert _released(manual.state) == _released(auto) == (None, {"live": 100.0}, 0.0, False)
    assert manual.state.window_epoch > 0 and auto.window_epoch > 0


def test_rollback_decision_is_pure():
    from slotserve.control.transitions import rollback as rollback_transition
    one, two, three = (SlotRef(f"demo:{i}", f"sha256:{i}") for i in (1, 2, 3))
    s = DesiredState(version=7, live=two, previous=one, candidate=three, evict_previous=True,
                     weights={"live": 100.0}, window_epoch=3)
    t, rollout = rollback_transition(s, None, 10.0, reason="bad", trigger="manual")
    assert rollout is None
    assert t.changes["live"] == one and t.changes["previous"] == two
    assert t.changes["candidate"] is None and t.changes["evict_previous"] is False
    assert t.changes["window_epoch"] == 4 and "rollout_phase" not in t.changes
    assert [(r.action, r.bundle) for r in t.ledger] == [("abort", "demo:3"), ("rollback", "demo:1")]
    assert t.ledger[1].metrics == {"trigger": "manual"}
    with pytest.raises(ControlError) as ei:
        rollback_transition(DesiredState(live=two, candidate=three), None, 10.0, reason="", trigger="manual")
    assert ei.value.code == "no_previous" and "rollout abort" in ei.value.message


def _slots(**held) -> dict:
    """A replica's reported SlotManager state holding `held` (slot -> SlotRef)."""
    return {"slots": {n: {"ref": r.ref, "digest": r.digest, "tier": "device"} for n, r in held.items()}}


def test_warm_check_is_pure():
    """Issue 14 #1: a change whose new live a serving replica does not hold is refused, naming
    the replica and what it holds; a replica still starting (no live yet) does not block."""
    from slotserve.control.state import ReplicaInfo
    from slotserve.control.transitions import check_warm
    one, two = SlotRef("demo:1", "sha256:1"), SlotRef("demo:2", "sha256:2")
    ok = ReplicaInfo("r-ok", slots=_slots(live=two, previous=one))
    starting = ReplicaInfo("r-new", slots=_slots())
    broken = ReplicaInfo("r-bad", slots=_slots(live=two), loading="previous: demo:1",
                         error={"version": 4, "message": "BundleError: digest mismatch"})
    check_warm(one, [ok, starting], "rollback")
    check_warm(None, [broken], "rollback")
    with pytest.raises(ControlError) as ei:
        check_warm(one, [ok, broken, starting], "rollback")
    e = ei.value
    assert (e.status, e.code) == (409, "not_warm")
    assert "replica r-bad" in e.message and "demo:1" in e.message and "previous empty" in e.message
    assert "digest mismatch" in e.message and "nothing changed" in e.message


def test_rollback_and_promote_refused_when_a_replica_lacks_the_new_live(core, request):
    """Fed by replica reports as the controller gets them: the state is unchanged, no ledger row."""
    live, prev = core.state.live, core.state.previous
    core.report("r1", {"applied": core.state.version, "ready": True, "slots": _slots(live=live, previous=prev)})
    core.report("r2", {"applied": -1, "ready": False, "slots": _slots(live=live),
                       "error": {"version": core.state.version, "message": "digest mismatch in weights"}})
    before, rows = core.state, len(core.ledger(100))
    with pytest.raises(ControlError) as ei:
        core.rollback(actor="op")
    assert ei.value.status == 409 and "replica r2" in ei.value.message and "digest mismatch" in ei.value.message
    assert core.state == before and len(core.ledger(100)) == rows
    core.report("r2", {"slots": _slots(live=live, previous=prev), "error": None})     # the retry worked
    core.rollback(actor="op")
    assert core.state.live == prev

    core.load("demo:3", actor="t")
    cand = core.state.candidate
    core.report("r1", {"slots": _slots(live=prev, previous=live, candidate=cand)})
    core.report("r2", {"slots": _slots(live=prev, previous=live)})
    before = core.state
    with pytest.raises(ControlError) as ei:
        core.promote(actor="op")
    assert "replica r2" in ei.value.message and "candidate empty" in ei.value.message
    assert core.state == before
