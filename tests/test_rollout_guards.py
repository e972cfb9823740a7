"""decide() and evaluate() driven by synthetic metric streams through real windows."""

import random

import pytest

from slotserve.rollout.guards import Advance, Alert, Hold, Promote, Rollback, StepState, decide, evaluate
from slotserve.rollout.shadow import compare
from slotserve.rollout.spec import Guard, RolloutSpec
from slotserve.rollout.window import RequestOutcome, WindowSet


def stream(ws, slot, n, *, seed=0, err=0.0, lat=20.0, jitter=5.0, ttft=5.0, nan=0.0, safety=0.0,
           down=None, shadow=None, oom=0):
    """Record n synthetic outcomes on `slot` (rates are Bernoulli probabilities)."""
    rng = random.Random(seed)
    for _ in range(n):
        ok = rng.random() >= err
        ws.record(RequestOutcome(slot, "b", lat + rng.uniform(-jitter, jitter), ttft, ok,
                                 nan=rng.random() < nan, safety_hit=rng.random() < safety, tokens=8))
        if down is not None:
            ws[slot].record_feedback(rng.random() >= down)
        if shadow is not None:  # shadow = fraction of greedy tokens that differ
            k = round(10 * shadow)
            ws[slot].record_shadow(compare(list(range(10)), [-1] * k + list(range(k, 10)), greedy=True))
    for _ in range(oom):
        ws.record(RequestOutcome(slot, "b", 1.0, None, ok=False, oom=True))


def mkspec(*guards, bake=10, min_requests=50, steps=(5, 50, 100), **kw):
    return RolloutSpec.parse({"bundle": "b:2", "steps": list(steps), "bake": bake,
                              "min_requests": min_requests, "guards": list(guards), **kw})


def g(metric, op, value, **kw):
    return {"metric": metric, "op": op, "value": value, **kw}


def run(spec, cand=None, live=None, *, step=None, now=100.0, n=200, ln=2000):
    ws = WindowSet(now=0.0)
    stream(ws, "candidate", n, seed=1, **(cand or {}))
    stream(ws, "live", ln, seed=2, **(live or {}))
    return decide(ws.snapshot(now), spec, step or StepState(0, 0.0), now)


# (guard, bad candidate stream, healthy candidate stream)
GUARDS = [
    (g("error_rate", ">", 0.02), {"err": 0.2}, {"err": 0.0}),
    (g("p50_latency_ms", ">", 100), {"lat": 300}, {"lat": 20}),
    (g("p99_latency_ms", ">", 1.5, relative_to="live"), {"lat": 60}, {"lat": 22}),
    (g("p99_ttft_ms", ">", 2.0, relative_to="live"), {"ttft": 30.0}, {"ttft": 5.0}),
    (g("nan_rate", ">", 0.0), {"nan": 0.05}, {"nan": 0.0}),
    (g("safety_hit_rate", ">", 0.01), {"safety": 0.1}, {"safety": 0.0}),
    (g("safety_hit_rate", ">", 2.0, relative_to="live"), {"safety": 0.3}, {"safety": 0.05}),
    (g("thumbs_down_rate", ">", 0.2), {"down": 0.5}, {"down": 0.05}),
    (g("shadow_disagreement", ">", 0.5), {"shadow": 0.8}, {"shadow": 0.1}),
    (g("oom_events", ">", 0), {"oom": 1}, {}),
]
LIVE = {"lat": 20.0, "ttft": 5.0, "safety": 0.05}


@pytest.mark.parametrize("guard,bad,good", GUARDS, ids=[x[0]["metric"] + str(i) for i, x in enumerate(GUARDS)])
def test_each_guard_breaches_on_bad_and_not_on_good(guard, bad, good):
    spec = mkspec(guard)
    act = run(spec, bad, LIVE)
    assert isinstance(act, Rollback), act
    assert act.metrics.get("guard") == spec.guards[0].name or act.metrics.get("candidate.oom_events") == 1
    good_act = run(spec, good, LIVE)
    assert isinstance(good_act, Advance), good_act


@pytest.mark.parametrize("guard,bad,good", GUARDS[:-1], ids=[x[0]["metric"] for x in GUARDS[:-1]])
def test_alert_action_alerts_instead(guard, bad, good):
    spec = mkspec({**guard, "action": "alert"})
    act = run(spec, bad, LIVE)
    assert isinstance(act, Alert) and act.guard == spec.guards[0].name
    # already alerted in this step: no second alert; not paused -> the step may go on
    assert isinstance(run(spec, bad, LIVE, step=StepState(0, 0.0, frozenset({act.guard}))), Advance)
    assert isinstance(run(spec, bad, LIVE, step=StepState(0, 0.0, frozenset({act.guard}), paused=True)), Hold)


def test_min_samples_no_flapping_on_a_handful():
    spec = mkspec(g("error_rate", ">", 0.02), min_requests=0, bake=0)
    # 3 of 3 requests failed: 100% error rate, but below the default 20 samples -> no verdict
    assert isinstance(run(spec, {"err": 1.0}, n=3), Advance)
    assert isinstance(run(spec, {"err": 1.0}, n=19), Advance)
    assert isinstance(run(spec, {"err": 1.0}, n=20), Rollback)
    own = mkspec(g("error_rate", ">", 0.02, min_samples=100), min_requests=0, bake=0)
    assert isinstance(run(own, {"err": 1.0}, n=99), Advance)
    assert isinstance(run(own, {"err": 1.0}, n=100), Rollback)


def test_relative_guard_needs_live_samples_too():
    spec = mkspec(g("p99_latency_ms", ">", 1.5, relative_to="live"), min_requests=0, bake=0)
    assert isinstance(run(spec, {"lat": 200}, {"lat": 20}, ln=5), Advance)  # live too thin
    assert isinstance(run(spec, {"lat": 200}, {"lat": 20}, ln=20), Rollback)
    assert isinstance(run(spec, {"lat": 200}, {"lat": 180}), Advance)  # live slow too: relative ok


def test_relative_threshold_is_ratio_of_live_same_window():
    guard = Guard("p99_latency_ms", ">", 1.5, relative_to="live")
    ws = WindowSet()
    stream(ws, "live", 100, lat=100, jitter=0)
    stream(ws, "candidate", 100, lat=150, jitter=0)
    m = ws.snapshot(1.0)
    r = evaluate(guard, m["candidate"], m["live"])
    assert r.threshold == 150 and r.value == 150 and not r.breached and r.enough_samples
    stream(ws, "candidate", 100, lat=151, jitter=0)
    m = ws.snapshot(1.0)
    r = evaluate(guard, m["candidate"], m["live"])
    assert r.breached and r.live_value == 100 and r.metrics()["live.p99_latency_ms"] == 100


def test_baseline_stands_in_when_live_is_empty():
    # At the 100% step live serves nothing: relative guards use live from the previous step.
    spec = mkspec(g("p99_latency_ms", ">", 1.5, relative_to="live"), min_requests=0, bake=0)
    base = WindowSet()
    stream(base, "live", 100, lat=20)
    step = StepState(2, 0.0, baseline=base.snapshot(1.0)["live"])
    assert isinstance(run(spec, {"lat": 200}, ln=0, step=step), Rollback)
    assert isinstance(run(spec, {"lat": 22}, ln=0, step=step), Promote)
    assert isinstance(run(spec, {"lat": 200}, ln=0, step=StepState(2, 0.0)), Promote)  # no baseline


def test_single_oom_rolls_back_immediately_even_without_a_guard():
    spec = mkspec()  # no guards at all
    act = run(spec, {"oom": 1}, n=0, now=0.5)  # before bake, zero other requests
    assert isinstance(act, Rollback) and "out of memory" in act.reason
    assert act.metrics["candidate.oom_events"] == 1


def test_advance_needs_bake_and_min_requests():
    spec = mkspec(bake=30, min_requests=50)
    assert isinstance(run(spec, n=500, now=29.9), Hold)  # traffic but not baked
    h = run(spec, n=49, now=300)  # baked but too few requests
    assert isinstance(h, Hold) and "49/50" in h.reason
    a = run(spec, n=50, now=30.0)
    assert a == Advance(1, 50.0)


def test_last_step_promotes_or_waits_for_manual():
    spec = mkspec(steps=(5, 50, 100))
    assert run(spec, step=StepState(1, 0.0)) == Advance(2, 100.0)
    assert isinstance(run(spec, step=StepState(2, 0.0)), Promote)
    manual = mkspec(steps=(5, 50), promote="manual")
    h = run(manual, step=StepState(1, 0.0))
    assert isinstance(h, Hold) and "manual promote" in h.reason


def test_rollback_beats_alert_and_alerts_come_one_guard_at_a_time():
    spec = mkspec(g("thumbs_down_rate", ">", 0.2, action="alert"), g("nan_rate", ">", 0.0, action="alert"),
                  g("error_rate", ">", 0.02))
    bad = {"down": 0.6, "nan": 0.2, "err": 0.3}
    assert isinstance(run(spec, bad), Rollback)
    spec2 = mkspec(*[x for x in spec.to_dict()["guards"] if x["action"] == "alert"])
    a1 = run(spec2, bad)
    a2 = run(spec2, bad, step=StepState(0, 0.0, frozenset({a1.guard})))
    assert isinstance(a2, Alert) and a2.guard != a1.guard
    assert isinstance(run(spec2, bad, step=StepState(0, 0.0, frozenset({a1.guard, a2.guard}), True)), Hold)


def test_eval_guard_idle_while_running():
    spec = mkspec(g("eval_score", "<", 0.95, relative_to="live"))
    assert isinstance(run(spec), Advance)  # the windows carry no eval score during steps


def test_decide_is_pure():
    spec = mkspec(g("error_rate", ">", 0.02))
    ws = WindowSet()
    stream(ws, "candidate", 100, err=0.1)
    snap = ws.snapshot(50.0)
    assert all(decide(snap, spec, StepState(0, 0.0), 50.0) == decide(snap, spec, StepState(0, 0.0), 50.0)
               for _ in range(3))
    assert isinstance(decide({}, mkspec(bake=0, min_requests=0), StepState(0, 0.0), 0.0), Advance)
