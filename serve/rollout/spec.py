"""Rollout spec: what a rollout does and what "bad" means, validated before anything moves.

`RolloutSpec.parse(dict)` / `RolloutSpec.from_yaml(text)` refuse an impossible spec
with a `SpecError` whose message says what is valid. The format is documented in
docs/rollout.md. Every strategy becomes a *plan*: the candidate's traffic percentage
per step, where 0 means "mirrored only" (shadow traffic at `shadow_fraction`):

    shadow      (0,)          mirror; promotes only with `promote: auto`
    canary      steps         default (1, 5, 25, 50, 100)
    ramp        steps         default (10, 25, 50, 75, 100)
    blue_green  (0, 100)      checks on mirrored traffic, then all traffic at once
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import yaml

from slotserve.rollout.safety import SafetyConfig

STRATEGIES = ("shadow", "canary", "ramp", "blue_green")
# Guardable metrics: each is a field of `slotserve.rollout.window.WindowMetrics`.
METRICS = (
    "error_rate", "p50_latency_ms", "p99_latency_ms", "p50_ttft_ms", "p99_ttft_ms",
    "oom_events", "nan_rate", "safety_hit_rate", "thumbs_down_rate",
    "shadow_disagreement", "shadow_length_ratio", "eval_score",
)
FRACTION_METRICS = frozenset({"error_rate", "nan_rate", "safety_hit_rate", "thumbs_down_rate",
                              "shadow_disagreement", "eval_score"})
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
ACTIONS = ("rollback", "alert")
PROMOTE = ("auto", "manual")
DEFAULT_STEPS = {"canary": (1.0, 5.0, 25.0, 50.0, 100.0), "ramp": (10.0, 25.0, 50.0, 75.0, 100.0)}
# Samples a guard needs before it may breach (so a handful of requests cannot flap it).
# oom_events needs none: a single out-of-memory error is enough.
DEFAULT_MIN_SAMPLES = {"oom_events": 0, "eval_score": 1, "thumbs_down_rate": 10,
                       "shadow_disagreement": 10, "shadow_length_ratio": 10}
DEFAULT_MIN_SAMPLES_OTHER = 20
GUARD_KEYS = ("metric", "op", "value", "action", "relative_to", "min_samples")
SPEC_KEYS = ("bundle", "strategy", "steps", "bake", "min_requests", "sticky_key", "guards",
             "alert_webhook", "shadow_fraction", "promote", "safety")
_STICKY = re.compile(r"^(none|header:[A-Za-z0-9_-]+|body:[A-Za-z_][A-Za-z0-9_]*)$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class SpecError(ValueError):
    """An invalid rollout spec; the message names the field and what is valid."""


def _num(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise SpecError(f"{where} must be a finite number; got {x!r}")
    return float(x)


def parse_duration(x: Any, where: str = "bake") -> float:
    """'30s', '2m', '1h', '500ms', or a number of seconds -> seconds (>= 0)."""
    if isinstance(x, str):
        m = _DURATION.match(x)
        if not m:
            raise SpecError(f"{where} must be a duration like '30s', '2m', '1h', '500ms' "
                            f"or a number of seconds; got {x!r}")
        return float(m.group(1)) * _UNIT_S[m.group(2)]
    s = _num(x, where)
    if s < 0:
        raise SpecError(f"{where} must be >= 0 seconds; got {x!r}")
    return s


def _check_keys(d: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(d, Mapping):
        raise SpecError(f"{where} must be a mapping with keys {', '.join(valid)}; got {type(d).__name__}")
    unknown = sorted(str(k) for k in set(d) - set(valid))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")


@dataclass(frozen=True)
class Guard:
    metric: str
    op: str
    value: float
    action: str = "rollback"
    relative_to: str | None = None  # "live": value is a ratio of live's metric in the same window
    min_samples: int | None = None  # None: DEFAULT_MIN_SAMPLES for the metric

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise SpecError(f"unknown metric {self.metric!r}; valid metrics: {', '.join(METRICS)}")
        if self.op not in OPS:
            raise SpecError(f"op {self.op!r} is not valid for {self.metric}; valid ops: {', '.join(OPS)}")
        object.__setattr__(self, "value", _num(self.value, f"value of {self.metric}"))
        if self.action not in ACTIONS:
            raise SpecError(f"action {self.action!r} is not valid; valid actions: {', '.join(ACTIONS)}")
        if self.relative_to not in (None, "live"):
            raise SpecError(f"relative_to {self.relative_to!r} is not valid; the only valid value is 'live'")
        if self.relative_to and self.value < 0:
            raise SpecError(f"{self.metric}: a relative_to: live value is a ratio and must be >= 0; got {self.value}")
        if (self.op == ">=" and self.value <= 0) or (self.op == ">" and self.value < 0):
            # every metric is >= 0: this guard would breach on a perfect candidate
            raise SpecError(f"{self.metric} {self.op} {self.value:g} is always breached (metrics are >= 0); "
                            f"use '>' with a value >= 0, e.g. {{metric: {self.metric}, op: '>', value: 0}}")
        if not self.relative_to and self.metric in FRACTION_METRICS and not 0 <= self.value <= 1:
            raise SpecError(f"{self.metric} is a fraction in [0, 1] (e.g. 0.02 for 2%); got {self.value}")
        if self.min_samples is None:
            default = DEFAULT_MIN_SAMPLES.get(self.metric, DEFAULT_MIN_SAMPLES_OTHER)
            object.__setattr__(self, "min_samples", default)
        elif isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 0:
            raise SpecError(f"min_samples must be an integer >= 0; got {self.min_samples!r}")

    @property
    def name(self) -> str:
        """Stable identity within a spec, e.g. 'p99_latency_ms > 1.5 x live'."""
        return f"{self.metric} {self.op} {self.value:g}" + (" x live" if self.relative_to else "")

    def compare(self, value: float, threshold: float) -> bool:
        return OPS[self.op](value, threshold)

    @classmethod
    def parse(cls, d: Any, where: str = "guard") -> "Guard":
        _check_keys(d, GUARD_KEYS, where)
        for k in ("metric", "op", "value"):
            if k not in d:
                raise SpecError(f"{where}: missing {k!r}; a guard needs metric, op and value, "
                                f"e.g. {{metric: error_rate, op: '>', value: 0.02, action: rollback}}")
        try:
            return cls(**{k: d[k] for k in GUARD_KEYS if k in d})
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {"metric": self.metric, "op": self.op, "value": self.value, "action": self.action,
             "min_samples": self.min_samples}
        if self.relative_to:
            d["relative_to"] = self.relative_to
        return d


@dataclass(frozen=True)
class RolloutSpec:
    bundle: str
    strategy: str = "canary"
    steps: tuple[float, ...] = ()  # canary/ramp: empty means DEFAULT_STEPS
    bake_s: float = 30.0  # minimum time per step (shadow: how long to mirror)
    min_requests: int = 50  # candidate requests (served or mirrored) per step before advancing
    sticky_key: str = "none"
    guards: tuple[Guard, ...] = ()
    alert_webhook: str | None = None
    shadow_fraction: float | None = None  # shadow/blue_green only; default 0.1
    promote: str | None = None  # auto|manual; default manual for shadow, else auto
    safety: SafetyConfig | None = None
    plan: tuple[float, ...] = field(init=False)  # candidate percent per step; 0 = mirrored only

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen normalisation)
        if not isinstance(self.bundle, str) or not self.bundle.strip():
            raise SpecError("bundle must be a bundle reference such as 'support-bot:2' or 'support-bot@candidate'")
        if self.strategy not in STRATEGIES:
            raise SpecError(f"strategy {self.strategy!r} is not valid; valid strategies: {', '.join(STRATEGIES)}")
        put("promote", self.promote or ("manual" if self.strategy == "shadow" else "auto"))
        if self.promote not in PROMOTE:
            raise SpecError(f"promote {self.promote!r} is not valid; valid values: {', '.join(PROMOTE)}")
        self._set_plan(put)
        put("bake_s", parse_duration(self.bake_s))
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 0:
            raise SpecError(f"min_requests must be an integer >= 0; got {self.min_requests!r}")
        if not isinstance(self.sticky_key, str) or not _STICKY.match(self.sticky_key):
            raise SpecError(f"sticky_key {self.sticky_key!r} is not valid; use 'header:NAME' "
                            "(e.g. header:x-session-id), 'body:FIELD' (e.g. body:user) or 'none'")
        if self.sticky_key.startswith("header:"):
            put("sticky_key", self.sticky_key.lower())  # HTTP header names are case-insensitive
        put("guards", tuple(g if isinstance(g, Guard) else Guard.parse(g, f"guards[{i}]")
                            for i, g in enumerate(self.guards)))
        names = [g.name for g in self.guards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"duplicate guard(s) {', '.join(dup)}; each metric/op/value may appear once")
        blind = [g.name for g in self.guards if g.relative_to == "live" and g.metric != "eval_score"]
        if self.plan and self.plan[0] == 100 and blind:
            # At 100% live serves nothing, so a guard relative to live has nothing to compare
            # with and could never fire (eval_score is measured on both slots by the gate).
            raise SpecError(f"guard(s) {', '.join(blind)} compare with live, but the first step sends "
                            "100% of traffic to the candidate, so live has no samples; start with a "
                            "smaller step (e.g. steps: [10, 100]) or use absolute values")
        if self.alert_webhook is not None:
            u = urlparse(self.alert_webhook) if isinstance(self.alert_webhook, str) else None
            if u is None or u.scheme not in ("http", "https") or not u.netloc:
                raise SpecError(f"alert_webhook must be an http:// or https:// URL; got {self.alert_webhook!r}")

    def _set_plan(self, put: Callable[[str, Any], None]) -> None:
        mirrored = self.strategy in ("shadow", "blue_green")
        if self.shadow_fraction is not None and not mirrored:
            raise SpecError("shadow_fraction applies only to strategy shadow or blue_green "
                            f"(mirrored traffic); strategy {self.strategy} routes real traffic by steps")
        if mirrored:
            frac = 0.1 if self.shadow_fraction is None else _num(self.shadow_fraction, "shadow_fraction")
            if not 0 < frac <= 1:
                raise SpecError(f"shadow_fraction is the mirrored fraction of requests, in (0, 1]; got {frac}")
            put("shadow_fraction", frac)
        steps = self.steps
        if mirrored:
            if steps and tuple(steps) != (100,):
                raise SpecError(f"steps do not apply to strategy {self.strategy} "
                                "(shadow mirrors at shadow_fraction; blue_green goes 0 -> 100 at once); omit steps")
            put("steps", ())
            put("plan", (0.0,) if self.strategy == "shadow" else (0.0, 100.0))
            return
        if isinstance(steps, (str, bytes)) or not isinstance(steps, (list, tuple)):
            raise SpecError(f"steps must be a list of percentages, e.g. [1, 5, 25, 50, 100]; got {steps!r}")
        steps = tuple(_num(s, "each step") for s in steps) or DEFAULT_STEPS[self.strategy]
        if any(not 0 < s <= 100 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
            raise SpecError("steps must be strictly increasing percentages of traffic, each in (0, 100], "
                            f"e.g. [1, 5, 25, 50, 100]; got {list(steps)}")
        if self.promote == "auto" and steps[-1] != 100:
            raise SpecError(f"steps must end at 100 with promote: auto (the last step promotes); got "
                            f"{list(steps)}. To stop short and promote by hand, set promote: manual")
        put("steps", steps)
        put("plan", steps)

    @property
    def has_eval_gate(self) -> bool:
        return any(g.metric == "eval_score" for g in self.guards)

    def mirror_fraction(self, step_index: int) -> float:
        """Fraction of live requests mirrored to the candidate during this step."""
        return float(self.shadow_fraction or 0.0) if self.plan[step_index] == 0 else 0.0

    @classmethod
    def parse(cls, d: Any) -> "RolloutSpec":
        _check_keys(d, SPEC_KEYS, "rollout spec")
        if "bundle" not in d:
            raise SpecError("rollout spec: missing 'bundle' (the candidate, e.g. 'support-bot:2')")
        kw = {k: d[k] for k in ("bundle", "strategy", "min_requests", "sticky_key", "alert_webhook",
                                "shadow_fraction", "promote") if k in d and d[k] is not None}
        if d.get("steps") is not None:  # null: the strategy's default
            kw["steps"] = d["steps"]
        if "bake" in d:
            kw["bake_s"] = parse_duration(d["bake"])
        guards = d.get("guards") or []
        if not isinstance(guards, (list, tuple)):
            raise SpecError(f"guards must be a list of guards; got {type(guards).__name__}")
        kw["guards"] = tuple(Guard.parse(g, f"guards[{i}]") for i, g in enumerate(guards))
        if d.get("safety") is not None:
            try:
                kw["safety"] = SafetyConfig.from_dict(d["safety"])
            except ValueError as e:
                raise SpecError(str(e)) from None
        return cls(**kw)

    @classmethod
    def from_yaml(cls, text: str) -> "RolloutSpec":
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"rollout spec is not valid YAML: {e}") from None
        return cls.parse(d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `RolloutSpec.parse(spec.to_dict()) == spec`."""
        d: dict[str, Any] = {"bundle": self.bundle, "strategy": self.strategy, "bake": self.bake_s,
                             "min_requests": self.min_requests, "sticky_key": self.sticky_key,
                             "guards": [g.to_dict() for g in self.guards], "promote": self.promote}
        if self.steps:
            d["steps"] = list(self.steps)
        if self.shadow_fraction is not None:
            d["shadow_fraction"] = self.shadow_fraction
        if self.alert_webhook:
            d["alert_webhook"] = self.alert_webhook
        if self.safety is not None:
            d["safety"] = self.safety.to_dict()
        return d
