"""The decision: a pure function of the window metrics, the spec and the step state.

`decide(windows, spec, step, now) -> Action`, in order of precedence:

1. any out-of-memory on the candidate -> Rollback (whatever the guards say: the slot
   layer has already released the candidate, so the rollout cannot go on);
2. a breached `action: rollback` guard -> Rollback(reason, metrics);
3. a breached `action: alert` guard not yet alerted in this step -> Alert (once per
   guard per step: `step.alerted` carries the names already sent);
4. paused (after an alert, waiting for a human) -> Hold;
5. bake time not over, or fewer than `min_requests` candidate requests -> Hold;
6. last step -> Promote (promote: auto) or Hold (promote: manual); else Advance.

A guard judges only with `min_samples` observations on the candidate — and, when
`relative_to: live`, on live over the same window. When live has too few (e.g. at the
100% step live serves nothing) the step's `baseline` (live's metrics at the end of the
previous step) stands in. Guards lacking samples never block advancing: choose
`min_requests` >= the guards' `min_samples` so every step is judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

from slotserve.rollout.spec import Guard, RolloutSpec
from slotserve.rollout.window import WindowMetrics


@dataclass(frozen=True)
class GuardResult:
    guard: Guard
    value: float | None  # the candidate's metric
    threshold: float | None  # absolute, or guard.value x live's metric
    breached: bool
    enough_samples: bool
    samples: int = 0  # candidate observations behind `value`
    live_value: float | None = None  # relative guards: live's metric used for the threshold

    def metrics(self) -> dict[str, float | int | str | None]:
        """Flat, JSON-ready figures for the ledger and the alert webhook."""
        m = self.guard.metric
        return {"guard": self.guard.name, f"candidate.{m}": self.value, f"live.{m}": self.live_value,
                "threshold": self.threshold, "samples": self.samples}


@dataclass(frozen=True)
class StepState:
    """What decide needs to know about the current step (the rollout keeps it)."""

    index: int
    started_at: float
    alerted: frozenset[str] = frozenset()  # guard names already alerted in this step
    paused: bool = False  # an alert is waiting for a human (promote, resume or abort)
    baseline: WindowMetrics | None = None  # live at the end of the previous step


@dataclass(frozen=True)
class Hold:
    reason: str = ""


@dataclass(frozen=True)
class Advance:
    index: int  # the step to start
    weight: float  # candidate percent in that step (0: mirrored only)


@dataclass(frozen=True)
class Promote:
    reason: str = "auto"


@dataclass(frozen=True)
class Rollback:
    reason: str
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    guard: str
    reason: str
    metrics: dict = field(default_factory=dict)


Action = Union[Hold, Advance, Promote, Rollback, Alert]


def evaluate(guard: Guard, cand: WindowMetrics, live: WindowMetrics) -> GuardResult:
    """Judge one guard; `breached` is only ever True with `enough_samples`."""
    m = guard.metric
    value, n = cand.value(m), cand.samples(m)
    if m == "oom_events":  # a single OOM is enough: no sample minimum
        enough = True
    else:
        enough = value is not None and n >= guard.min_samples
    live_value = threshold = None
    if guard.relative_to == "live":
        live_value = live.value(m)
        enough = enough and live_value is not None and live.samples(m) >= guard.min_samples
        threshold = guard.value * live_value if live_value is not None else None
    else:
        threshold = guard.value
    breached = bool(enough and value is not None and threshold is not None and guard.compare(value, threshold))
    return GuardResult(guard, value, threshold, breached, enough, n, live_value)


def _live_for(guard: Guard, live: WindowMetrics, baseline: WindowMetrics | None) -> WindowMetrics:
    if guard.relative_to and baseline is not None and live.samples(guard.metric) < guard.min_samples:
        return baseline
    return live


def evaluate_all(windows: Mapping[str, WindowMetrics], spec: RolloutSpec,
                 step: StepState) -> tuple[GuardResult, ...]:
    cand, live = _cand_live(windows, step)
    return tuple(evaluate(g, cand, _live_for(g, live, step.baseline)) for g in spec.guards)


def _cand_live(windows: Mapping[str, WindowMetrics], step: StepState) -> tuple[WindowMetrics, WindowMetrics]:
    cand = windows.get("candidate") or WindowMetrics.empty("candidate", step.started_at)
    live = windows.get("live") or WindowMetrics.empty("live", step.started_at)
    return cand, live


def _reason(r: GuardResult) -> str:
    g = r.guard
    thr = f"{r.threshold:g}" if r.threshold is not None else "?"
    rel = f" ({g.value:g} x live {r.live_value:g})" if g.relative_to and r.live_value is not None else ""
    return f"{g.metric} {r.value:g} {g.op} {thr}{rel} over {r.samples} samples"


def decide(windows: Mapping[str, WindowMetrics], spec: RolloutSpec, step: StepState, now: float) -> Action:
    assert 0 <= step.index < len(spec.plan), (step.index, spec.plan)
    cand, live = _cand_live(windows, step)
    if cand.oom_events > 0:
        return Rollback(f"candidate out of memory ({cand.oom_events} event(s))",
                        {"candidate.oom_events": cand.oom_events, "candidate.requests": cand.requests})
    results = evaluate_all(windows, spec, step)
    for r in results:
        if r.breached and r.guard.action == "rollback":
            return Rollback(_reason(r), r.metrics())
    for r in results:
        if r.breached and r.guard.action == "alert" and r.guard.name not in step.alerted:
            return Alert(r.guard.name, _reason(r), r.metrics())
    if step.paused:
        return Hold("paused after an alert: promote, resume or abort")
    left = spec.bake_s - (now - step.started_at)
    if left > 0:
        return Hold(f"baking: {left:.1f}s left")
    if cand.requests < spec.min_requests:
        return Hold(f"waiting for requests: {cand.requests}/{spec.min_requests}")
    if step.index == len(spec.plan) - 1:
        if spec.promote == "auto":
            return Promote("auto")
        return Hold("last step done: waiting for a manual promote")
    return Advance(step.index + 1, spec.plan[step.index + 1])
