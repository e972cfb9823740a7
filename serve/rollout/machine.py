r"""The rollout state machine (pure): steps, bake, eval gate, promote, rollback, abort.

Every transition is a function `(state, ..., now) -> (new_state, [events])`; states
and events are frozen. The serving layer owns the clock, the windows and the side
effects: it turns events into slot operations, router weights and ledger records.

    pending_eval --on_eval(pass)--> running --tick: Advance--> running (next step)
         |                            |  \--tick: Promote / promote()--> promoted
         |                            |--tick: Rollback / on_oom()--> rolled_back
         \------------ abort() -------+--------------------------------> aborted

An `alert` guard breach emits `Alerted` and pauses the rollout at its step (guards
keep running; hard breaches still roll back) until a human calls `promote`, `resume`
or `abort`. Weights are candidate/live percentages; mirroring (weight 0 steps of
shadow and blue_green) is `mirror_fraction`. "Rolled back" means traffic returns to
live and the candidate is released — live never changed, so this is not
`SlotManager.rollback` (previous -> live), which stays a separate human command.
Pass wall-clock seconds (time.time()) as `now` if states are persisted (`to_dict`)
and resumed after a restart: bake time then carries over.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Mapping, Union

from slotserve.rollout.guards import Advance, Alert, Promote, Rollback, StepState, decide, evaluate, evaluate_all
from slotserve.rollout.spec import RolloutSpec
from slotserve.rollout.window import WindowMetrics

PHASES = ("pending_eval", "running", "promoted", "rolled_back", "aborted")
ACTIVE = ("pending_eval", "running")


class RolloutError(ValueError):
    """An operation the rollout's phase does not allow; the message says which do."""


@dataclass(frozen=True)
class Started:
    bundle: str
    strategy: str
    phase: str
    weights: dict
    mirror_fraction: float
    at: float


@dataclass(frozen=True)
class EvalGated:
    passed: bool
    candidate_score: float
    live_score: float
    reason: str
    at: float


@dataclass(frozen=True)
class StepAdvanced:
    index: int
    weights: dict  # {"live": %, "candidate": %}
    mirror_fraction: float
    at: float


@dataclass(frozen=True)
class Promoted:
    reason: str  # "auto" or "manual: ..."
    at: float


@dataclass(frozen=True)
class RolledBack:
    reason: str
    metrics: dict  # the figures that triggered it (for the ledger)
    step: int  # step index it happened in
    at: float


@dataclass(frozen=True)
class Alerted:
    guard: str
    reason: str
    metrics: dict
    webhook: str | None  # spec.alert_webhook, where the serving layer posts event_dict(...)
    step: int
    at: float


@dataclass(frozen=True)
class Aborted:
    reason: str
    at: float
    trigger: str = "manual"   # "manual" (an operator) | "eval" (the eval gate could not run)


@dataclass(frozen=True)
class Resumed:
    at: float


Event = Union[Started, EvalGated, StepAdvanced, Promoted, RolledBack, Alerted, Aborted, Resumed]


def event_dict(e: Event) -> dict:
    """JSON-ready form for the ledger and logs: {"event": "RolledBack", ...fields}."""
    return {"event": type(e).__name__, **asdict(e)}


def _weights(candidate_pct: float) -> dict[str, float]:
    return {"live": 100.0 - candidate_pct, "candidate": float(candidate_pct)}


@dataclass(frozen=True)
class RolloutState:
    spec: RolloutSpec
    candidate: str  # bundle ref of the candidate (spec.bundle)
    live: str | None  # bundle ref that was live when the rollout started
    phase: str
    salt: str  # one per rollout: routing stays sticky and monotone across steps
    started_at: float
    step_index: int
    step_started_at: float
    weights: dict[str, float]
    mirror_fraction: float
    alerted: frozenset[str] = frozenset()
    paused: bool = False
    baseline: WindowMetrics | None = None
    ended_at: float | None = None
    reason: str = ""  # why it ended
    history: tuple = field(default=(), repr=False)

    def __post_init__(self) -> None:
        assert self.phase in PHASES, self.phase
        assert 0 <= self.step_index < len(self.spec.plan)

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    @property
    def step(self) -> StepState:
        return StepState(self.step_index, self.step_started_at, self.alerted, self.paused, self.baseline)

    def to_dict(self) -> dict:
        """JSON-ready, for the registry: `RolloutState.from_dict(s.to_dict()) == s`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(spec=self.spec.to_dict(), weights=dict(self.weights), alerted=sorted(self.alerted),
                 baseline=self.baseline.to_dict() if self.baseline else None,
                 history=[event_dict(e) for e in self.history])
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "RolloutState":
        kinds = {c.__name__: c for c in Event.__args__}
        history = tuple(kinds[e["event"]](**{k: v for k, v in e.items() if k != "event"}) for e in d["history"])
        return cls(**{**d, "spec": RolloutSpec.parse(d["spec"]), "alerted": frozenset(d["alerted"]),
                      "baseline": WindowMetrics(**d["baseline"]) if d.get("baseline") else None,
                      "weights": dict(d["weights"]), "history": history})


def _emit(state: RolloutState, events: list, **changes) -> RolloutState:
    return replace(state, history=state.history + tuple(events), **changes)


def _require_active(state: RolloutState, op: str) -> None:
    if not state.active:
        raise RolloutError(f"cannot {op}: the rollout of {state.candidate} is {state.phase}; "
                           f"{op} applies only while it is {' or '.join(ACTIVE)}")


def start(spec: RolloutSpec, now: float, live: str | None = None, salt: str | None = None) -> RolloutState:
    """pending_eval if the spec has an eval_score guard, else running at step 0; then apply
    `state.weights` / `state.mirror_fraction` and reset the windows."""
    phase = "pending_eval" if spec.has_eval_gate else "running"
    weights = _weights(0.0 if phase == "pending_eval" else spec.plan[0])
    mirror = 0.0 if phase == "pending_eval" else spec.mirror_fraction(0)
    state = RolloutState(spec=spec, candidate=spec.bundle, live=live, phase=phase,
                         salt=salt or f"{spec.bundle}@{now!r}", started_at=now, step_index=0,
                         step_started_at=now, weights=weights, mirror_fraction=mirror)
    return _emit(state, [Started(spec.bundle, spec.strategy, phase, dict(weights), mirror, now)])


def _enter_step(state: RolloutState, index: int, now: float,
                live: WindowMetrics | None) -> tuple[RolloutState, StepAdvanced]:
    weights, mirror = _weights(state.spec.plan[index]), state.spec.mirror_fraction(index)
    baseline = live if live is not None and live.requests > 0 else state.baseline
    ev = StepAdvanced(index, dict(weights), mirror, now)
    return _emit(state, [ev], phase="running", step_index=index, step_started_at=now, weights=weights,
                 mirror_fraction=mirror, alerted=frozenset(), paused=False, baseline=baseline), ev


def _end(state: RolloutState, phase: str, reason: str, events: list, now: float) -> RolloutState:
    weights = {"live": 100.0, "candidate": 0.0}  # after promote, "live" *is* the old candidate
    return _emit(state, events, phase=phase, weights=weights, mirror_fraction=0.0, ended_at=now,
                 reason=reason, paused=False)


def on_eval(state: RolloutState, candidate_score: float, live_score: float, now: float,
            items: int = 1) -> tuple[RolloutState, list[Event]]:
    """Gate step 0 on eval scores in [0, 1] (slotserve.rollout.evals): a breached rollback guard rolls
    back, an alert guard starts step 0 paused. No-op outside pending_eval (aborted meanwhile)."""
    if state.phase != "pending_eval":
        return state, []
    cand = replace(WindowMetrics.empty("candidate", now), eval_score=candidate_score, eval_items=items)
    live = replace(WindowMetrics.empty("live", now), eval_score=live_score, eval_items=items)
    results = [evaluate(g, cand, live) for g in state.spec.guards if g.metric == "eval_score"]
    hard = [r for r in results if r.breached and r.guard.action == "rollback"]
    soft = [r for r in results if r.breached and r.guard.action == "alert"]
    scores = f"eval_score {candidate_score:g} vs live {live_score:g}"
    if hard:
        reason = f"eval gate failed: {scores} ({hard[0].guard.name})"
        events: list[Event] = [EvalGated(False, candidate_score, live_score, reason, now),
                               RolledBack(reason, hard[0].metrics(), 0, now)]
        return _end(state, "rolled_back", reason, events, now), events
    gate = EvalGated(not soft, candidate_score, live_score,
                     f"eval gate alert: {soft[0].guard.name}" if soft else "eval gate passed", now)
    state, step_ev = _enter_step(_emit(state, [gate]), 0, now, None)
    alerts = [Alerted(r.guard.name, scores, r.metrics(), state.spec.alert_webhook, 0, now) for r in soft]
    if alerts:
        state = _emit(state, alerts, paused=True, alerted=frozenset(a.guard for a in alerts))
    return state, [gate, step_ev, *alerts]


def tick(state: RolloutState, windows: Mapping[str, WindowMetrics], now: float) -> tuple[RolloutState, list[Event]]:
    """Apply `decide` to the current windows. Call it periodically (e.g. every 0.25 s) and
    after notable outcomes; a no-op unless running. On StepAdvanced reset the windows."""
    if state.phase != "running":
        return state, []
    events: list[Event] = []
    while True:  # each Alert adds its guard to `alerted`, so this ends within len(guards)
        action = decide(windows, state.spec, state.step, now)
        if not isinstance(action, Alert):
            break
        ev = Alerted(action.guard, action.reason, action.metrics, state.spec.alert_webhook,
                     state.step_index, now)
        state = _emit(state, [ev], alerted=state.alerted | {action.guard}, paused=True)
        events.append(ev)
    if isinstance(action, Rollback):
        ev = RolledBack(action.reason, action.metrics, state.step_index, now)
        return _end(state, "rolled_back", action.reason, [ev], now), events + [ev]
    if isinstance(action, Promote):
        ev = Promoted(action.reason, now)
        return _end(state, "promoted", action.reason, [ev], now), events + [ev]
    if isinstance(action, Advance):
        state, ev = _enter_step(state, action.index, now, windows.get("live"))
        events.append(ev)
    return state, events


def promote(state: RolloutState, now: float, reason: str = "") -> tuple[RolloutState, list[Event]]:
    """Human promote at any point of an active rollout (skips the remaining steps)."""
    _require_active(state, "promote")
    why = "manual" + (f": {reason}" if reason else "")
    ev = Promoted(why, now)
    return _end(state, "promoted", why, [ev], now), [ev]


def abort(state: RolloutState, reason: str, now: float, trigger: str = "manual") -> tuple[RolloutState, list[Event]]:
    """Stop: traffic back to live, candidate released (like a rollback, but chosen by an
    operator, or forced when the eval gate cannot run)."""
    _require_active(state, "abort")
    ev = Aborted(reason or "aborted", now, trigger)
    return _end(state, "aborted", ev.reason, [ev], now), [ev]


def resume(state: RolloutState, now: float) -> tuple[RolloutState, list[Event]]:
    """Acknowledge the alerts of this step and let it advance again (they do not re-fire)."""
    if state.phase != "running" or not state.paused:
        raise RolloutError(f"cannot resume: only a running rollout paused by an alert resumes "
                           f"(phase {state.phase}, paused {state.paused})")
    ev = Resumed(now)
    return _emit(state, [ev], paused=False), [ev]


def on_oom(state: RolloutState, now: float, detail: Mapping | None = None) -> tuple[RolloutState, list[Event]]:
    """The slot layer hit OOM on the candidate (and released it): roll back now. No-op once
    ended (after promote, OOM on live is the slot layer's load shedding)."""
    if not state.active:
        return state, []
    metrics = {"candidate.oom_events": 1, **dict(detail or {})}
    ev = RolledBack("candidate out of memory", metrics, state.step_index, now)
    return _end(state, "rolled_back", ev.reason, [ev], now), [ev]


def describe(state: RolloutState, windows: Mapping[str, WindowMetrics], now: float) -> dict:
    """JSON-ready status for `slotserve rollout status` / GET /admin/rollout."""
    spec = state.spec
    out = {"bundle": state.candidate, "live": state.live, "strategy": spec.strategy,
           "phase": state.phase, "step": state.step_index, "steps": list(spec.plan),
           "weights": dict(state.weights), "mirror_fraction": state.mirror_fraction,
           "paused": state.paused, "started_at": state.started_at, "ended_at": state.ended_at,
           "reason": state.reason, "guards": []}
    gate = next((e for e in reversed(state.history) if isinstance(e, EvalGated)), None)
    if gate is not None:  # the eval gate's verdict, for as long as the rollout is shown
        out["eval_gate"] = {"passed": gate.passed, "candidate": gate.candidate_score, "live": gate.live_score,
                            "reason": gate.reason, "at": gate.at}
    if state.phase != "running":
        return out
    cand = windows.get("candidate")
    out["requests"] = cand.requests if cand else 0
    out["min_requests"] = spec.min_requests
    out["time_to_next_step_s"] = max(0.0, spec.bake_s - (now - state.step_started_at))
    action = decide(windows, spec, state.step, now)
    out["next"] = {"action": type(action).__name__, **asdict(action)}
    out["guards"] = [{"guard": r.guard.name, "action": r.guard.action, "value": r.value,
                      "threshold": r.threshold, "breached": r.breached, "enough_samples": r.enough_samples,
                      "samples": r.samples, "min_samples": r.guard.min_samples,
                      "alerted": r.guard.name in state.alerted}
                     for r in evaluate_all(windows, spec, state.step)]
    return out
