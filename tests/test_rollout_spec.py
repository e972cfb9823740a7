"""RolloutSpec: parsing, defaults, round trip, and a table of bad specs whose errors say what is valid."""

import dataclasses
import pathlib

import pytest

from slotserve.rollout.spec import METRICS, Guard, RolloutSpec, SpecError, parse_duration
from slotserve.rollout.window import WindowMetrics

REPO = pathlib.Path(__file__).resolve().parents[1]

DESIGN_YAML = """
bundle: support-bot:2
strategy: canary
steps: [1, 5, 25, 50, 100]
bake: 30s
min_requests: 50
sticky_key: header:x-session-id
guards:
  - {metric: error_rate, op: ">", value: 0.02, action: rollback}
  - {metric: p99_latency_ms, op: ">", value: 1.5, relative_to: live, action: rollback}
  - {metric: oom_events, op: ">", value: 0, action: rollback}
  - {metric: safety_hit_rate, op: ">", value: 0.01, action: rollback}
  - {metric: eval_score, op: "<", value: 0.95, relative_to: live, action: rollback}
  - {metric: thumbs_down_rate, op: ">", value: 0.2, action: alert}
alert_webhook: http://127.0.0.1:9000/hook
"""


def test_design_example_parses():
    s = RolloutSpec.from_yaml(DESIGN_YAML)
    assert s.strategy == "canary" and s.plan == (1, 5, 25, 50, 100)
    assert s.bake_s == 30 and s.min_requests == 50 and s.promote == "auto"
    assert s.sticky_key == "header:x-session-id"
    assert [g.action for g in s.guards].count("alert") == 1
    assert s.guards[1].relative_to == "live" and s.guards[1].min_samples == 20
    assert s.guards[2].min_samples == 0  # a single OOM is enough
    assert s.has_eval_gate


@pytest.mark.parametrize("name", ["rollout-canary.yaml", "rollout-blue-green.yaml"])
def test_examples_parse(name):
    s = RolloutSpec.from_yaml((REPO / "examples" / name).read_text())
    assert RolloutSpec.parse(s.to_dict()) == s


def test_round_trip_and_defaults():
    s = RolloutSpec.parse({"bundle": "b:1", "strategy": "ramp"})
    assert s.plan == (10, 25, 50, 75, 100) and s.sticky_key == "none" and s.promote == "auto"
    assert RolloutSpec.parse(s.to_dict()) == s
    sh = RolloutSpec.parse({"bundle": "b:1", "strategy": "shadow", "safety": {"terms": ["x"]}})
    assert sh.plan == (0,) and sh.shadow_fraction == 0.1 and sh.promote == "manual"
    assert sh.mirror_fraction(0) == 0.1 and RolloutSpec.parse(sh.to_dict()) == sh
    bg = RolloutSpec.parse({"bundle": "b:1", "strategy": "blue_green", "shadow_fraction": 0.5})
    assert bg.plan == (0, 100) and bg.mirror_fraction(0) == 0.5 and bg.mirror_fraction(1) == 0
    manual = RolloutSpec.parse({"bundle": "b:1", "steps": [5, 50], "promote": "manual"})
    assert manual.plan == (5, 50)
    assert RolloutSpec.parse({"bundle": "b:1", "sticky_key": "header:X-User"}).sticky_key == "header:x-user"
    assert RolloutSpec.parse({"bundle": "b:1", "steps": None}).plan == (1, 5, 25, 50, 100)
    direct = RolloutSpec("b:1", guards=[{"metric": "nan_rate", "op": ">", "value": 0}])
    assert direct.guards == (Guard("nan_rate", ">", 0),)


def test_every_metric_is_a_window_field():
    fields = {f.name for f in dataclasses.fields(WindowMetrics)}
    assert set(METRICS) <= fields
    for m in METRICS:
        WindowMetrics.empty("candidate").samples(m)  # each has a sample count


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("2m", 120), ("1h", 3600), ("500ms", 0.5),
                                          ("45", 45), (12, 12), (0, 0), (1.5, 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def G(**kw):
    return {"metric": "error_rate", "op": ">", "value": 0.02, **kw}


BAD = [
    # (spec, words the message must contain)
    ({"bundle": "b:1", "strategy": "yolo"}, ["shadow", "canary", "ramp", "blue_green"]),
    ({"bundle": "b:1", "steps": [5, 1, 100]}, ["strictly increasing", "(0, 100]"]),
    ({"bundle": "b:1", "steps": [5, 5, 100]}, ["strictly increasing"]),
    ({"bundle": "b:1", "steps": [0, 50, 100]}, ["(0, 100]"]),
    ({"bundle": "b:1", "steps": [50, 150]}, ["(0, 100]"]),
    ({"bundle": "b:1", "steps": [1, 5, 50]}, ["end at 100", "promote: manual"]),
    ({"bundle": "b:1", "steps": "1,5,100"}, ["list of percentages"]),
    ({"bundle": "b:1", "steps": [1, "x", 100]}, ["finite number"]),
    ({"bundle": "b:1", "bake": "soon"}, ["'30s'", "'2m'"]),
    ({"bundle": "b:1", "bake": -3}, [">= 0"]),
    ({"bundle": "b:1", "min_requests": -1}, ["integer >= 0"]),
    ({"bundle": "b:1", "min_requests": 2.5}, ["integer >= 0"]),
    ({"bundle": "b:1", "sticky_key": "cookie:sid"}, ["header:NAME", "body:FIELD", "none"]),
    ({"bundle": "b:1", "guards": [G(metric="vibes")]}, ["guards[0]", "error_rate", "p99_latency_ms"]),
    ({"bundle": "b:1", "guards": [G(op="==")]}, ["valid ops", ">=", "<="]),
    ({"bundle": "b:1", "guards": [G(value="high")]}, ["finite number"]),
    ({"bundle": "b:1", "guards": [G(value=2)]}, ["fraction in [0, 1]"]),
    ({"bundle": "b:1", "guards": [G(action="panic")]}, ["rollback", "alert"]),
    ({"bundle": "b:1", "guards": [G(relative_to="yesterday")]}, ["'live'"]),
    ({"bundle": "b:1", "guards": [G(relative_to="live", value=-1)]}, ["ratio", ">= 0"]),
    ({"bundle": "b:1", "guards": [G(min_samples=-5)]}, ["integer >= 0"]),
    ({"bundle": "b:1", "guards": [G(colour="red")]}, ["unknown key", "colour", "metric, op, value"]),
    ({"bundle": "b:1", "guards": [{"metric": "error_rate", "op": ">"}]}, ["missing 'value'"]),
    ({"bundle": "b:1", "guards": {"metric": "error_rate"}}, ["list of guards"]),
    ({"bundle": "b:1", "guards": [G(metric="oom_events", op=">=", value=0)]}, ["always breached", "'>'"]),
    ({"bundle": "b:1", "guards": [G(op=">", value=-0.1)]}, ["always breached"]),
    ({"bundle": "b:1", "guards": [G(), G(action="alert")]}, ["duplicate", "error_rate > 0.02"]),
    ({"bundle": "b:1", "alert_webhook": "ftp://x/hook"}, ["http://", "https://"]),
    ({"bundle": "b:1", "alert_webhook": "hook"}, ["http://", "https://"]),
    ({"bundle": "b:1", "strategy": "shadow", "shadow_fraction": 0}, ["(0, 1]"]),
    ({"bundle": "b:1", "strategy": "shadow", "shadow_fraction": 1.5}, ["(0, 1]"]),
    ({"bundle": "b:1", "strategy": "canary", "shadow_fraction": 0.1}, ["shadow or blue_green"]),
    ({"bundle": "b:1", "strategy": "blue_green", "steps": [50, 100]}, ["omit steps"]),
    ({"bundle": "b:1", "promote": "later"}, ["auto", "manual"]),
    ({"bundle": "b:1", "safety": {"terms": "bomb"}}, ["list of strings"]),
    ({"bundle": "b:1", "safety": {"patterns": ["("]}}, ["valid Python regex"]),
    ({"bundle": "b:1", "safety": {"words": ["x"]}}, ["terms, patterns, include_defaults"]),
    ({"bundle": "b:1", "stratgy": "canary"}, ["unknown key", "stratgy", "valid keys", "strategy", "bake"]),
    ({"strategy": "canary"}, ["missing 'bundle'"]),
    ({"bundle": ""}, ["bundle reference"]),
    (["bundle", "b:1"], ["mapping"]),
]


@pytest.mark.parametrize("spec,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_specs_say_what_is_valid(spec, words):
    with pytest.raises(SpecError) as e:
        RolloutSpec.parse(spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_yaml():
    with pytest.raises(SpecError, match="not valid YAML"):
        RolloutSpec.from_yaml("bundle: [unclosed")
    with pytest.raises(SpecError, match="mapping"):
        RolloutSpec.from_yaml("- just a list")


def test_guard_direct_construction_validates():
    g = Guard("p99_latency_ms", ">", 1.5, relative_to="live")
    assert g.name == "p99_latency_ms > 1.5 x live" and g.min_samples == 20
    assert g.compare(2.0, 1.0) and not g.compare(1.0, 1.0)
    with pytest.raises(SpecError, match="valid metrics"):
        Guard("nope", ">", 1)


def test_relative_guard_needs_live_traffic_in_the_first_step():
    import pytest
    from slotserve.rollout.spec import RolloutSpec, SpecError

    guard = {"metric": "p99_latency_ms", "op": ">", "value": 1.5, "relative_to": "live", "action": "rollback"}
    with pytest.raises(SpecError, match="live has no samples"):
        RolloutSpec.parse({"bundle": "b:2", "strategy": "canary", "steps": [100], "guards": [guard]})
    RolloutSpec.parse({"bundle": "b:2", "strategy": "canary", "steps": [10, 100], "guards": [guard]})
    # the eval gate measures both slots itself, so it is fine at 100%
    RolloutSpec.parse({"bundle": "b:2", "strategy": "canary", "steps": [100], "guards": [
        {"metric": "eval_score", "op": "<", "value": 0.95, "relative_to": "live", "action": "rollback"}]})
