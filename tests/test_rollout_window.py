"""Metric windows, shadow diffs and the safety filter."""

import threading

import pytest

from slotserve.rollout.safety import DEFAULT_TERMS, SafetyCheck, SafetyConfig, SafetyFilter
from slotserve.rollout.shadow import ShadowDiff, compare, token_agreement
from slotserve.rollout.window import MetricWindow, RequestOutcome, WindowMetrics, WindowSet, percentile


def out(slot="candidate", bundle="b:2", latency=10.0, **kw):
    return RequestOutcome(slot=slot, bundle=bundle, latency_ms=latency, **kw)


def test_empty_window_has_no_rates():
    m = MetricWindow("candidate", started_at=5.0).snapshot(7.5)
    assert m.requests == 0 and m.duration_s == 2.5
    assert m.error_rate is None and m.p99_latency_ms is None and m.thumbs_down_rate is None
    assert WindowMetrics(**m.to_dict()) == m  # JSON-ready and lossless


def test_counts_rates_and_percentiles():
    w = MetricWindow("candidate", "b:2", 0.0)
    for i in range(1, 101):  # latencies 1..100 ms
        w.record(out(latency=float(i), ttft_ms=i / 10, tokens=3))
    for _ in range(10):
        w.record(out(latency=5000.0, ok=False))  # failures are not in the latency percentiles
    w.record(out(latency=1.0, nan=True, safety_hit=True))
    w.record(out(latency=1.0, ok=False, oom=True))
    m = w.snapshot(10.0)
    assert m.requests == 112 and m.errors == 11 and m.error_rate == pytest.approx(11 / 112)
    assert m.latency_samples == 101 and m.p50_latency_ms == 50.0 and m.p99_latency_ms == 99.0
    assert m.ttft_samples == 100 and m.p99_ttft_ms == pytest.approx(9.9)
    assert m.oom_events == 1 and m.nan_rate == pytest.approx(1 / 112)
    assert m.safety_hit_rate == pytest.approx(1 / 112) and m.tokens == 300
    assert m.samples("error_rate") == 112 and m.samples("p99_latency_ms") == 101


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
    assert percentile([float(i) for i in range(1, 11)], 0.99) == 10.0


def test_bounded_latency_samples_exact_counts():
    w = MetricWindow("live", max_samples=100)
    for i in range(1000):
        w.record(out("live", latency=float(i)))
    m = w.snapshot(1.0)
    assert m.requests == 1000 and m.latency_samples == 100 and m.p50_latency_ms >= 900


def test_feedback_shadow_and_eval():
    w = MetricWindow("candidate")
    for up in [True] * 7 + [False] * 3:
        w.record_feedback(up)
    w.record_shadow(compare([1, 2, 3, 4], [1, 2, 9, 4], greedy=True))  # 0.25 disagreement
    w.record_shadow(compare([1, 2], [1, 2, 3, 4], greedy=False))  # sampled: length only
    w.record_shadow(compare([1], None, greedy=True))  # shadow failed: 1.0
    w.set_eval(0.8, 25)
    m = w.snapshot(1.0)
    assert m.feedback == 10 and m.thumbs_down_rate == pytest.approx(0.3)
    assert m.shadow_comparisons == 2 and m.shadow_disagreement == pytest.approx((0.25 + 1.0) / 2)
    assert m.shadow_length_samples == 2 and m.shadow_length_ratio == pytest.approx((1.0 + 2.0) / 2)
    assert m.eval_score == 0.8 and m.samples("eval_score") == 25


def test_reset_and_bundle_filter():
    ws = WindowSet(now=0.0)
    ws.reset(10.0, {"live": "b:1", "candidate": "b:2"})
    assert ws.record(out("candidate", "b:2"))
    assert not ws.record(out("candidate", "b:1"))  # a straggler from another bundle
    assert not ws.record(out("previous", "b:0"))  # no window for that slot
    assert not ws["candidate"].record_feedback(False, bundle="b:9")
    snap = ws.snapshot(12.0)
    assert snap["candidate"].requests == 1 and snap["live"].requests == 0
    assert snap["candidate"].started_at == 10.0 and snap["candidate"].bundle == "b:2"
    ws.reset(20.0)
    assert ws.snapshot(20.0)["candidate"].requests == 0


def test_concurrent_recording_is_exact():
    w = MetricWindow("live")

    def hammer():
        for _ in range(2000):
            w.record(out("live", ok=False))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    m = w.snapshot(1.0)
    assert m.requests == 8000 and m.errors == 8000


# --- shadow diffs ------------------------------------------------------------------------

def test_token_agreement():
    assert token_agreement([], []) == 1.0
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 0.5
    assert token_agreement("a b c".split(), "a x c".split()) == pytest.approx(2 / 3)


def test_shadow_diff_disagreement():
    assert compare([1, 2], [1, 2], greedy=True).disagreement == 0.0
    assert compare([1, 2], [3, 4], greedy=True).disagreement == 1.0
    assert compare([1, 2], [3, 4], greedy=False).disagreement is None  # sampled: not comparable
    assert compare([1, 2], None, greedy=False).disagreement == 1.0  # shadow failed
    assert compare(None, None, greedy=True).disagreement == 0.0  # both failed: the request's fault
    d = compare([1], [1], greedy=True, shadow_safety_hit=True)
    assert d.disagreement == 1.0 and d.length_ratio == 1.0
    assert compare([], [1], greedy=True).length_ratio is None
    assert isinstance(d, ShadowDiff)


# --- safety ------------------------------------------------------------------------------

def test_default_filter():
    f = SafetyFilter()
    assert f.check("Sure! Here is HOW TO MAKE A BOMB at home")
    assert f.check("-----BEGIN RSA PRIVATE KEY-----\nMIIE")
    assert f.check("my ssn is 123-45-6789")
    assert not f.check("The bombastic speech was about chemistry.")
    assert not f.check("Paris is the capital of France.")
    assert f.hits("how to make a bomb") == ["how to make a bomb"]
    assert len(DEFAULT_TERMS) < 20  # small and documented


def test_configured_filter():
    f = SafetyFilter.from_config({"terms": ["Acme Secret"], "patterns": [r"pass(word)?\s*[:=]"],
                                  "include_defaults": False})
    assert f("leaked the acme secret roadmap")
    assert f("PASSWORD = hunter2")
    assert not f("acme secretive")  # whole words only for terms
    assert not f("how to make a bomb")  # defaults off
    assert not SafetyFilter(SafetyConfig(include_defaults=False)).check("anything")
    assert SafetyFilter.from_config(None).check("how to make a bomb")


def test_pluggable_protocol():
    def classifier(text: str) -> bool:
        return "bad" in text

    checks: list[SafetyCheck] = [SafetyFilter(), classifier]
    assert [c("bad") for c in checks] == [False, True]


@pytest.mark.parametrize("cfg,msg", [({"terms": [""]}, "non-empty"), ({"patterns": ["[a"]}, "regex"),
                                     ({"include_defaults": "yes"}, "true or false"),
                                     ({"x": 1}, "valid keys"), ("terms", "mapping")])
def test_bad_safety_config(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        SafetyFilter.from_config(cfg)
