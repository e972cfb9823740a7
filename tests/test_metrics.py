"""Slot gauges: what they say after slots change (no Ray: the gauges are recorded)."""

from types import SimpleNamespace

from slotserve.metrics import Metrics


class Recorder:
    def __init__(self):
        self.values = {}

    def set(self, value, tags):
        self.values[tuple(sorted(tags.items()))] = value


def test_gauges_of_a_bundle_that_left_a_slot_drop_to_zero():
    m = Metrics("r1")                       # outside Ray: no-op gauges, replaced by recorders
    m.memory, m.weight = Recorder(), Recorder()
    one, two = SimpleNamespace(ref="demo:1"), SimpleNamespace(ref="demo:2")
    state = {"slots": {"live": {"tier": "device", "held_bytes": 100, "shared_bytes": 0},
                       "candidate": {"tier": "device", "held_bytes": 50, "shared_bytes": 10}}}
    m.slots(state, {"live": one, "candidate": two}, {"live": 90.0, "candidate": 10.0})
    live1 = (("bundle", "demo:1"), ("slot", "live"))
    assert m.weight.values[live1] == 90.0
    # promote: demo:2 is live, demo:1 previous, nothing in candidate
    state = {"slots": {"live": {"tier": "device", "held_bytes": 50, "shared_bytes": 10},
                       "previous": {"tier": "host", "held_bytes": 100, "shared_bytes": 0}}}
    m.slots(state, {"live": two, "previous": one}, {"live": 100.0})
    w = m.weight.values
    assert w[(("bundle", "demo:2"), ("slot", "live"))] == 100.0
    assert w[live1] == 0.0 and w[(("bundle", "demo:2"), ("slot", "candidate"))] == 0.0   # not 200% on live
    assert sum(w.values()) == 100.0
    mem = m.memory.values
    held = {k: v for k, v in mem.items() if v and ("kind", "held") in k}
    assert held == {(("bundle", "demo:1"), ("kind", "held"), ("slot", "previous"), ("tier", "host")): 100.0,
                    (("bundle", "demo:2"), ("kind", "held"), ("slot", "live"), ("tier", "device")): 50.0}
