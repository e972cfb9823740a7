"""Eval sets: parsing, scoring rules, generate() failures, and the eval gate of a rollout."""

import json

import pytest

from slotserve.rollout import machine as rollout
from slotserve.rollout.evals import EvalError, load_eval, parse_eval, run_eval, score_output
from slotserve.rollout.machine import Alerted, EvalGated, RolledBack, StepAdvanced
from slotserve.rollout.spec import RolloutSpec

LINES = [
    {"prompt": "2+2=", "expected": "4"},
    {"messages": [{"role": "user", "content": "Capital of France?"}], "expected": "paris"},
    {"prompt": "Say hi", "expected": r"^(hi|hello)\b", "match": "regex"},
    {"prompt": "Echo OK", "expected": "OK", "match": "exact"},
]
TEXT = "\n".join(json.dumps(x) for x in LINES) + "\n\n"


def test_parse_and_run():
    items = parse_eval(TEXT)
    assert len(items) == 4 and items[1].input == [{"role": "user", "content": "Capital of France?"}]
    answers = {"2+2=": " 4 ", "Say hi": "hello there", "Echo OK": "OK\n"}

    def generate(p):
        return answers[p] if isinstance(p, str) else "It is Paris."

    rep = run_eval(items, generate)
    assert rep.score == 1.0 and rep.passed == rep.items == 4


def test_failures_and_errors_score_zero_for_the_item():
    items = parse_eval(TEXT)

    def generate(p):
        if isinstance(p, list):
            raise RuntimeError("boom")
        return "nope"

    rep = run_eval(items, generate)
    assert rep.score == 0.0 and rep.results[1].error == "RuntimeError: boom"
    assert run_eval((), generate).score == 0.0


@pytest.mark.parametrize("out,exp,match,ok", [
    ("The answer is PARIS", "paris", "contains", True), ("Lyon", "paris", "contains", False),
    (" OK ", "OK", "exact", True), ("ok", "OK", "exact", False),
    ("hello world", r"^hel+o", "regex", True), ("say hello", r"^hello", "regex", False)])
def test_score_output(out, exp, match, ok):
    assert score_output(out, exp, match) is ok


@pytest.mark.parametrize("line,msg", [
    ("not json", "line 1: not valid JSON"), ("[1]", "JSON object"),
    ('{"expected": "x"}', "exactly one of 'prompt'"),
    ('{"prompt": "a", "messages": [], "expected": "x"}', "exactly one"),
    ('{"prompt": "a"}', "'expected' must be a string"),
    ('{"prompt": "a", "expected": "x", "match": "fuzzy"}', "contains, exact, regex"),
    ('{"prompt": "a", "expected": "(", "match": "regex"}', "not a valid regex"),
    ('{"messages": [{"role": "user"}], "expected": "x"}', "role"),
    ('{"prompt": "a", "expected": "x", "weight": 2}', "valid keys")])
def test_bad_eval_lines(line, msg):
    with pytest.raises(EvalError, match=msg):
        parse_eval(line)


def test_load_eval(tmp_path):
    with pytest.raises(EvalError, match="no eval/eval.jsonl"):
        load_eval(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="no items"):
        load_eval(tmp_path)
    (tmp_path / "eval" / "eval.jsonl").write_text(TEXT)
    assert len(load_eval(tmp_path)) == 4


def spec(action="rollback"):
    return RolloutSpec.parse({"bundle": "b:2", "steps": [10, 100], "guards": [
        {"metric": "eval_score", "op": "<", "value": 0.95, "relative_to": "live", "action": action}]})


def test_gate_pass_starts_step_zero():
    s = rollout.start(spec(), 0.0, live="b:1")
    assert s.phase == "pending_eval" and s.weights["candidate"] == 0
    s2, ev = rollout.on_eval(s, 0.96, 1.0, 5.0, items=50)
    assert [type(e) for e in ev] == [EvalGated, StepAdvanced] and ev[0].passed
    assert s2.phase == "running" and s2.weights == {"live": 90.0, "candidate": 10.0}
    assert s2.step_started_at == 5.0


def test_gate_fail_rolls_back_before_any_traffic():
    s, ev = rollout.on_eval(rollout.start(spec(), 0.0), 0.80, 1.0, 5.0, items=50)
    assert s.phase == "rolled_back" and s.weights["candidate"] == 0
    assert [type(e) for e in ev] == [EvalGated, RolledBack] and not ev[0].passed
    assert ev[1].metrics["candidate.eval_score"] == 0.80 and ev[1].metrics["threshold"] == pytest.approx(0.95)
    assert "eval" in s.reason and s.history[-1] == ev[1]


def test_gate_alert_starts_paused():
    s, ev = rollout.on_eval(rollout.start(spec("alert"), 0.0), 0.5, 1.0, 5.0)
    assert s.phase == "running" and s.paused
    assert [type(e) for e in ev] == [EvalGated, StepAdvanced, Alerted]


def test_on_eval_after_abort_is_noop():
    s, _ = rollout.abort(rollout.start(spec(), 0.0), "changed my mind", 1.0)
    assert rollout.on_eval(s, 1.0, 1.0, 2.0) == (s, [])
