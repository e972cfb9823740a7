"""The rollout state machine end to end over simulated traffic (router + windows + tick)."""

import json
import random
from collections import Counter, defaultdict

import pytest

from slotserve.rollout import machine as rollout
from slotserve.rollout.machine import (Aborted, Alerted, Promoted, Resumed, RolledBack, RolloutError, StepAdvanced,
                               event_dict)
from slotserve.rollout.router import route, shadow_mirror
from slotserve.rollout.shadow import compare
from slotserve.rollout.spec import RolloutSpec
from slotserve.rollout.window import RequestOutcome, WindowSet

HEALTHY = {"err": 0.0, "lat": 20.0}
GUARDS = [
    {"metric": "error_rate", "op": ">", "value": 0.05, "action": "rollback"},
    {"metric": "p99_latency_ms", "op": ">", "value": 1.5, "relative_to": "live", "action": "rollback"},
    {"metric": "oom_events", "op": ">", "value": 0, "action": "rollback"},
    {"metric": "safety_hit_rate", "op": ">", "value": 0.01, "action": "rollback"},
    {"metric": "thumbs_down_rate", "op": ">", "value": 0.3, "action": "alert"},
]


def mkspec(**kw):
    d = {"bundle": "b:2", "strategy": "canary", "steps": [5, 25, 50, 100], "bake": "10s",
         "min_requests": 20, "sticky_key": "header:x-user", "guards": GUARDS, **kw}
    return RolloutSpec.parse(d)


class Sim:
    """rps requests per simulated second from 2000 users; tick once a second."""

    def __init__(self, spec, cand=HEALTHY, live=HEALTHY, rps=50, seed=0):
        self.state = rollout.start(spec, 0.0, live="b:1")
        self.ws = WindowSet(now=0.0)
        self.ws.reset(0.0, {"live": "b:1", "candidate": "b:2"})
        self.behave = {"candidate": cand, "live": live}
        self.rps, self.rng, self.t = rps, random.Random(seed), 0.0
        self.events, self.served = list(self.state.history), Counter()
        self.slots_by_user = defaultdict(list)  # user -> [(step, slot)]

    def outcome(self, slot):
        b, rng = self.behave[slot], self.rng
        self.served[slot] += 1
        oom = b.get("oom_after") is not None and self.served[slot] > b["oom_after"]
        ok = not oom and rng.random() >= b.get("err", 0.0)
        self.ws.record(RequestOutcome(slot, "b:1" if slot == "live" else "b:2", b.get("lat", 20.0) + rng.random(),
                                      2.0, ok, oom=oom, safety_hit=rng.random() < b.get("safety", 0.0)))
        if "down" in b:
            self.ws[slot].record_feedback(rng.random() >= b["down"])

    def second(self):
        for _ in range(self.rps):
            user = f"user-{self.rng.randrange(2000)}"
            slot = route(user, self.state.weights, self.state.salt)
            self.slots_by_user[user].append((self.state.step_index, slot))
            self.outcome(slot)
            if slot == "live" and shadow_mirror(user, self.state.mirror_fraction, self.state.salt):
                self.outcome("candidate")
                self.ws["candidate"].record_shadow(compare([1, 2, 3], [1, 2, 3], greedy=True))
        self.t += 1.0
        self.apply(*rollout.tick(self.state, self.ws.snapshot(self.t), self.t))

    def apply(self, state, events):
        self.state = state
        self.events += events
        if any(isinstance(e, StepAdvanced) for e in events):  # the serving layer's job
            self.ws.reset(self.t, {"live": "b:1", "candidate": "b:2"})

    def run(self, seconds=300):
        while self.state.active and self.t < seconds:
            self.second()
        return self

    def kinds(self):
        return [type(e).__name__ for e in self.events]


def test_healthy_canary_ramps_and_promotes():
    sim = Sim(mkspec()).run()
    steps = [e for e in sim.events if isinstance(e, StepAdvanced)]
    assert [e.weights["candidate"] for e in steps] == [25, 50, 100]
    assert sim.kinds()[-1] == "Promoted" and sim.state.phase == "promoted"
    assert sim.state.weights == {"live": 100.0, "candidate": 0.0} and sim.state.reason == "auto"
    assert sim.t >= 4 * 10  # every step baked
    assert all(b - a >= 10 for a, b in zip([0.0] + [e.at for e in steps], [e.at for e in steps]))


def test_users_do_not_bounce_back_to_live_during_a_ramp():
    sim = Sim(mkspec()).run()
    for user, seen in sim.slots_by_user.items():
        first = next((i for i, (_, s) in enumerate(seen) if s == "candidate"), None)
        if first is not None:
            assert all(s == "candidate" for _, s in seen[first:]), user


@pytest.mark.parametrize("cand,word", [
    ({"err": 0.3}, "error_rate"), ({"lat": 80.0}, "p99_latency_ms"),
    ({"oom_after": 3}, "out of memory"), ({"safety": 0.2}, "safety_hit_rate")])
def test_bad_candidate_rolled_back_at_first_step(cand, word):
    sim = Sim(mkspec(), cand=cand).run()
    assert sim.state.phase == "rolled_back" and word in sim.state.reason
    rb = sim.events[-1]
    assert isinstance(rb, RolledBack) and rb.metrics and sim.state.step_index == 0
    assert sim.state.weights["candidate"] == 0
    assert sim.served["candidate"] < 60  # pulled within its first window


def test_alert_once_pauses_then_resume_goes_on():
    sim = Sim(mkspec(), cand={**HEALTHY, "down": 0.8}).run(seconds=60)
    alerts = [e for e in sim.events if isinstance(e, Alerted)]
    assert len(alerts) == 1 and alerts[0].guard == "thumbs_down_rate > 0.3"
    assert alerts[0].webhook is None and alerts[0].metrics["candidate.thumbs_down_rate"] > 0.3
    assert sim.state.phase == "running" and sim.state.paused and sim.state.step_index == 0
    sim.apply(*rollout.resume(sim.state, sim.t))
    sim.run(seconds=120)
    assert sim.state.step_index >= 1  # advanced; alerted again only in later steps, once each
    per_step = Counter(e.step for e in sim.events if isinstance(e, Alerted))
    assert set(per_step) == {0, 1} and all(n == 1 for n in per_step.values()) and any(isinstance(e, Resumed) for e in sim.events)


def test_blue_green_checks_on_mirrored_traffic_then_flips():
    spec = mkspec(strategy="blue_green", steps=None, shadow_fraction=0.5)
    sim = Sim(spec)
    assert sim.state.weights == {"live": 100.0, "candidate": 0.0} and sim.state.mirror_fraction == 0.5
    sim.second()
    assert sim.served["candidate"] > 0 and sim.ws.snapshot(1.0)["candidate"].shadow_comparisons > 0
    sim.run()
    steps = [e for e in sim.events if isinstance(e, StepAdvanced)]
    assert [(e.weights["candidate"], e.mirror_fraction) for e in steps] == [(100.0, 0.0)]
    assert sim.state.phase == "promoted"


def test_blue_green_bad_candidate_never_gets_real_traffic():
    sim = Sim(mkspec(strategy="blue_green", steps=None, shadow_fraction=0.5), cand={"err": 0.5}).run()
    assert sim.state.phase == "rolled_back"
    assert not any(e.weights["candidate"] > 0 for e in sim.events if isinstance(e, StepAdvanced))


def test_shadow_waits_for_manual_promote():
    sim = Sim(mkspec(strategy="shadow", steps=None)).run(seconds=100)
    assert sim.state.phase == "running" and sim.state.weights["candidate"] == 0
    st, ev = rollout.promote(sim.state, sim.t, "looks good")
    assert st.phase == "promoted" and ev == [Promoted("manual: looks good", sim.t)]
    auto = Sim(mkspec(strategy="shadow", steps=None, promote="auto", shadow_fraction=1.0)).run()
    assert auto.state.phase == "promoted" and auto.t <= 20


def test_manual_promote_mid_ramp_and_abort():
    sim = Sim(mkspec()).run(seconds=15)
    assert sim.state.step_index == 1
    st, ev = rollout.abort(sim.state, "wrong bundle", sim.t)
    assert st.phase == "aborted" and ev == [Aborted("wrong bundle", sim.t)] and st.weights["candidate"] == 0
    for op in (lambda s: rollout.promote(s, 1.0), lambda s: rollout.abort(s, "x", 1.0),
               lambda s: rollout.resume(s, 1.0)):
        with pytest.raises(RolloutError, match="aborted"):
            op(st)
    assert rollout.tick(st, {}, 99.0) == (st, [])
    assert rollout.on_oom(st, 99.0) == (st, [])


def test_on_oom_rolls_back_now():
    st = rollout.start(mkspec(), 0.0)
    st2, ev = rollout.on_oom(st, 1.5, {"needed_bytes": 10})
    assert st2.phase == "rolled_back" and ev[0].metrics == {"candidate.oom_events": 1, "needed_bytes": 10}
    assert st2.ended_at == 1.5 and st2.history[-1] == ev[0]


def test_resume_requires_pause():
    with pytest.raises(RolloutError, match="paused"):
        rollout.resume(rollout.start(mkspec(), 0.0), 1.0)


def test_describe_and_events_are_json_ready():
    sim = Sim(mkspec(alert_webhook="http://127.0.0.1:9000/hook"), cand={**HEALTHY, "down": 0.8}).run(seconds=30)
    d = rollout.describe(sim.state, sim.ws.snapshot(sim.t), sim.t)
    json.dumps(d)
    assert d["phase"] == "running" and d["weights"]["candidate"] == 5.0 and d["paused"]
    assert d["next"]["action"] == "Hold" and d["requests"] > 0
    g = {x["guard"]: x for x in d["guards"]}
    assert g["thumbs_down_rate > 0.3"]["alerted"] and g["thumbs_down_rate > 0.3"]["breached"]
    assert g["error_rate > 0.05"]["threshold"] == 0.05 and not g["error_rate > 0.05"]["breached"]
    for e in sim.state.history:
        json.dumps(event_dict(e))
    assert event_dict(sim.events[0])["event"] == "Started"
    assert [e for e in sim.events if isinstance(e, Alerted)][0].webhook == "http://127.0.0.1:9000/hook"


def test_resumed_alert_guard_does_not_repause_in_same_step():
    sim = Sim(mkspec(), cand={**HEALTHY, "down": 0.8}).run(seconds=5)
    sim.apply(*rollout.resume(sim.state, sim.t))
    before = len([e for e in sim.events if isinstance(e, Alerted)])
    sim.second()
    assert len([e for e in sim.events if isinstance(e, Alerted)]) == before and not sim.state.paused


def test_state_round_trips_through_json():
    sim = Sim(mkspec(alert_webhook="http://127.0.0.1:9000/hook"), cand={**HEALTHY, "down": 0.8}).run(seconds=8)
    sim.apply(*rollout.resume(sim.state, sim.t))
    sim.run(seconds=30)
    assert sim.state.step_index == 1 and sim.state.baseline is not None and sim.state.alerted and len(sim.state.history) > 2
    d = json.loads(json.dumps(sim.state.to_dict()))
    back = rollout.RolloutState.from_dict(d)
    assert back == sim.state
    # a restored rollout carries on exactly as the original would
    snap = sim.ws.snapshot(sim.t + 1)
    assert rollout.tick(back, snap, sim.t + 1) == rollout.tick(sim.state, snap, sim.t + 1)
