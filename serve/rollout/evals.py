"""Run a bundle's eval set (`eval/eval.jsonl`) through a caller-supplied generate().

Each line is one item:

    {"prompt": "2+2=", "expected": "4"}
    {"messages": [{"role": "user", "content": "Capital of France?"}], "expected": "Paris"}
    {"prompt": "Say hi", "expected": "^(hi|hello)\\b", "match": "regex"}

`match` (per item; default from the caller, "contains" if not given) scores an output:
- contains: `expected` occurs in the output, ignoring case and surrounding whitespace;
- exact: the stripped output equals the stripped `expected` (case-sensitive);
- regex: Python `re.search(expected, output)`.

The score is the fraction of items passed, in [0, 1]. A generate() that raises fails
that item (recorded with the error) rather than the run. The rollout runs the same set
on candidate and live before the first step and compares the scores with the spec's
`eval_score` guard (`slotserve.rollout.machine.on_eval`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

MATCHES = ("contains", "exact", "regex")
Prompt = Union[str, list]  # a prompt string, or chat messages [{"role", "content"}, ...]
Generate = Callable[[Prompt], str]


class EvalError(ValueError):
    """A malformed eval file; the message names the line and what is valid."""


@dataclass(frozen=True)
class EvalItem:
    expected: str
    match: str = "contains"
    prompt: str | None = None
    messages: tuple = ()  # of {"role": str, "content": str}

    @property
    def input(self) -> Prompt:
        return self.prompt if self.prompt is not None else [dict(m) for m in self.messages]


@dataclass(frozen=True)
class ItemResult:
    index: int
    output: str | None
    passed: bool
    error: str | None = None


@dataclass(frozen=True)
class EvalReport:
    score: float  # passed / items; 0.0 for an empty set
    passed: int
    items: int
    results: tuple[ItemResult, ...]


def _item(d: Any, line: int, default_match: str) -> EvalItem:
    where = f"eval line {line}"
    if not isinstance(d, dict):
        raise EvalError(f"{where}: each line must be a JSON object with 'prompt' or 'messages' and 'expected'")
    unknown = sorted(set(d) - {"prompt", "messages", "expected", "match"})
    if unknown:
        raise EvalError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: prompt, messages, expected, match")
    if ("prompt" in d) == ("messages" in d):
        raise EvalError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if not isinstance(d.get("expected"), str):
        raise EvalError(f"{where}: 'expected' must be a string")
    match = d.get("match", default_match)
    if match not in MATCHES:
        raise EvalError(f"{where}: match {match!r} is not valid; valid: {', '.join(MATCHES)}")
    if match == "regex":
        try:
            re.compile(d["expected"])
        except re.error as e:
            raise EvalError(f"{where}: 'expected' is not a valid regex ({e})") from None
    if "prompt" in d:
        if not isinstance(d["prompt"], str):
            raise EvalError(f"{where}: 'prompt' must be a string")
        return EvalItem(d["expected"], match, prompt=d["prompt"])
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise EvalError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return EvalItem(d["expected"], match, messages=tuple(dict(m) for m in msgs))


def parse_eval(text: str, default_match: str = "contains") -> tuple[EvalItem, ...]:
    """Parse JSONL text; blank lines are skipped."""
    if default_match not in MATCHES:
        raise EvalError(f"default match {default_match!r} is not valid; valid: {', '.join(MATCHES)}")
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"eval line {n}: not valid JSON ({e.msg})") from None
        items.append(_item(d, n, default_match))
    return tuple(items)


def load_eval(bundle_dir: str | Path, default_match: str = "contains") -> tuple[EvalItem, ...]:
    """Items of `<bundle_dir>/eval/eval.jsonl`; EvalError when the bundle has none."""
    path = Path(bundle_dir) / "eval" / "eval.jsonl"
    if not path.is_file():
        raise EvalError(f"{bundle_dir} has no eval/eval.jsonl; an eval_score guard needs one in the candidate")
    items = parse_eval(path.read_text(encoding="utf-8"), default_match)
    if not items:
        raise EvalError(f"{path} has no items; an eval_score guard needs at least one")
    return items


def score_output(output: str, expected: str, match: str) -> bool:
    if match == "contains":
        return expected.strip().lower() in output.strip().lower()
    if match == "exact":
        return output.strip() == expected.strip()
    if match == "regex":
        return re.search(expected, output) is not None
    raise EvalError(f"match {match!r} is not valid; valid: {', '.join(MATCHES)}")


def run_eval(items: Sequence[EvalItem], generate: Generate, workers: int = 1) -> EvalReport:
    """Score every item; `workers` > 1 sends that many items at once (a batching engine
    answers them together), in item order in the report."""
    def one(i: int, it: EvalItem) -> ItemResult:
        try:
            out = generate(it.input)
        except Exception as e:  # noqa: BLE001 - a failing item, not a failing run
            return ItemResult(i, None, False, f"{type(e).__name__}: {e}")
        return ItemResult(i, out, score_output(str(out), it.expected, it.match))

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(len(items)), items))
    else:
        results = [one(i, it) for i, it in enumerate(items)]
    passed = sum(r.passed for r in results)
    return EvalReport(passed / len(results) if results else 0.0, passed, len(results), tuple(results))
