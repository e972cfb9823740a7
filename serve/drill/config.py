"""What a `slotserve drill` runs: its settings (`DrillConfig`), the faults it injects
(`parse_faults`), the built-in canary spec with a hard guard per fault (`drill_spec`),
and the faulty candidate it publishes (`publish_faulty`: live again, plus faults)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from slotserve.drill.load import DrillError

SCENARIOS = ("fault", "quality")


@dataclass(frozen=True)
class DrillConfig:
    url: str | None = None            # None: self-contained
    token: str | None = None
    store: str | None = None          # where to publish the candidate (self-contained: the server's store)
    candidate: str | None = None      # take this bundle instead of publishing one
    faults: dict = field(default_factory=lambda: {"error_rate": 0.5})
    spec: dict | None = None          # a rollout spec; its `bundle` is replaced by the candidate
    percent: float = 25.0             # the built-in spec's canary step
    concurrency: int = 4
    duration_s: float = 30.0          # longest wait for the candidate's start, then for the rollback
    rps: float = 0.0                  # 0: closed loop (each worker sends as soon as answered)
    baseline_s: float = 3.0           # load on live alone before the rollout
    settle_s: float = 3.0             # load after the rollback
    max_tokens: int = 8
    stream: bool = False
    model: str | None = None          # served model name (default: what /v1/models serves)
    poll_s: float = 0.05
    scenario: str = "fault"           # fault: an injected fault under load; quality: the eval gate
    tiny: bool = False                # self-contained: the random tiny demo model, not the real one
    eval_timeout_s: float = 600.0     # quality: longest wait for one eval gate

    def __post_init__(self):
        if self.concurrency < 1:
            raise DrillError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s <= 0:
            raise DrillError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.rps < 0 or self.settle_s < 0 or self.baseline_s < 0:
            raise DrillError("--rps, --settle and --baseline must be >= 0")
        if not 0 < self.percent <= 100:
            raise DrillError(f"--percent must be in (0, 100], got {self.percent}")
        if self.max_tokens < 1:
            raise DrillError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.scenario not in SCENARIOS:
            raise DrillError(f"unknown scenario {self.scenario!r}; valid: {', '.join(SCENARIOS)}")
        if self.scenario == "quality" and self.tiny:
            raise DrillError("the quality drill needs the real demo model: the tiny one answers nothing right")


def parse_faults(items: list[str] | None) -> dict:
    """['error_rate=0.5', 'nan_logits'] -> {'error_rate': 0.5, 'nan_logits': True}, validated."""
    from slotserve.slots.faults import FAULT_KEYS, Faults   # here: it imports torch, the CLI must not
    out: dict = {}
    for item in items or ["error_rate=0.5"]:
        for part in item.split(","):
            key, sep, raw = part.strip().partition("=")
            if key not in FAULT_KEYS:
                raise DrillError(f"unknown fault {key!r}: use error_rate=0.5, latency_ms=300, "
                                 "oom_after=3 or nan_logits")
            if key == "nan_logits":
                val: object = raw.strip().lower() not in ("0", "false", "no") if sep else True
            elif key == "oom_after":
                val = _number(raw, key, int)
            else:
                val = _number(raw, key, float)
            out[key] = val
    if out.get("oom_after") == 0:
        raise DrillError("oom_after=0 makes loading the candidate fail, so it never takes traffic; "
                         "drill an out-of-memory under load with oom_after=1 or more")
    try:
        Faults.from_dict(out)
    except ValueError as exc:
        raise DrillError(str(exc)) from None
    return out


def _number(raw: str, key: str, kind):
    try:
        return kind(raw)
    except ValueError:
        raise DrillError(f"fault {key} needs a {'whole ' if kind is int else ''}number, "
                         f"e.g. {key}={'3' if kind is int else '0.5'}; got {raw!r}") from None


def drill_spec(candidate: str, percent: float = 25.0) -> dict:
    """The built-in canary: one step at `percent`, held (never promotes by itself), with a
    hard guard for each fault a drill can inject. min_samples is low so a drill at a few
    requests per second is judged within seconds."""
    return {
        "bundle": candidate, "strategy": "canary", "steps": [float(percent)], "promote": "manual",
        "bake": "10m", "min_requests": 10, "sticky_key": "none",
        "guards": [
            {"metric": "error_rate", "op": ">", "value": 0.05, "min_samples": 10, "action": "rollback"},
            {"metric": "p99_latency_ms", "op": ">", "value": 2.0, "relative_to": "live",
             "min_samples": 10, "action": "rollback"},
            {"metric": "oom_events", "op": ">", "value": 0, "action": "rollback"},
            {"metric": "nan_rate", "op": ">", "value": 0.0, "min_samples": 5, "action": "rollback"},
        ],
    }


def load_spec(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise DrillError(f"cannot read the spec {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise DrillError(f"{path} must hold a rollout spec mapping (see docs/rollout.md)")
    return spec


def publish_faulty(store, live: str, faults: dict, actor: str = "slotserve-drill") -> str:
    """Publish `live` again with `faults` in its serving.json: same weights, tokenizer and
    prompt (the store shares the blobs), a new version. Returns its ref."""
    b = store.open(live)
    serving = json.loads((b.path / "serving.json").read_text())
    serving["faults"] = dict(faults)
    m = store.publish(b.path, b.manifest.name, actor=actor, serving=serving,
                      retrieval_index=b.manifest.retrieval_index, parent=live,
                      reason=f"drill candidate: {live} with faults {json.dumps(faults, sort_keys=True)}")
    return m.ref


def quality_spec(candidate: str, percent: float = 25.0) -> dict:
    """The quality drill's canary: held at one step, gated by the eval set before any
    traffic: a candidate scoring below 95% of live is rolled back."""
    spec = drill_spec(candidate, percent)
    spec["guards"] = [{"metric": "eval_score", "op": "<", "value": 0.95, "relative_to": "live",
                       "action": "rollback"}] + spec["guards"]
    return spec


def publish_prompt(store, live: str, system_prompt: str, reason: str, actor: str = "slotserve-drill") -> str:
    """Publish `live` again with another system prompt: same weights (shared blobs),
    tokenizer, serving config and eval set, a new version. Returns its ref."""
    import tempfile
    from pathlib import Path

    b = store.open(live)
    with tempfile.TemporaryDirectory(prefix="slotserve-drill-") as tmp:
        path = Path(tmp) / "system.txt"
        path.write_text(system_prompt + "\n", encoding="utf-8")
        m = store.publish(b.path, b.manifest.name, actor=actor, system_prompt=path,
                          retrieval_index=b.manifest.retrieval_index, parent=live, reason=reason)
    return m.ref
