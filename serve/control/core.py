"""The controller core, in plain Python (tested without Ray; the async actor shell around it
is `slotserve.control.controller.SlotController`). `ControllerCore`

* applies admin operations, decided by the pure `slotserve.control.transitions`, as new
  desired-state versions persisted by `slotserve.control.state_store`, so a restart comes
  back the same;
* takes replica reports (`slotserve.control.replicas`; request outcomes feed the rollout
  windows) and says when the replicas have converged;
* drives the rollout: `tick()` feeds the merged windows to `slotserve.rollout.machine.tick`
  and turns events into state changes, ledger rows and alert webhooks.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, replace
from typing import Any, Callable

from slotserve import SLOT_NAMES
from slotserve.control import transitions as tr
from slotserve.control.replicas import ReplicaTracker
from slotserve.control.state import DesiredState, ReplicaInfo, SlotRef, jsonable
from slotserve.control.state_store import StateStore
from slotserve.control.transitions import ControlError, LedgerRow, Transition, released
from slotserve.rollout import machine as ro
from slotserve.rollout.evals import EvalError, load_eval
from slotserve.rollout.feedback import RatedOnce
from slotserve.rollout.shadow import ShadowDiff
from slotserve.rollout.spec import RolloutSpec, SpecError
from slotserve.rollout.window import RequestOutcome, WindowSet


log = logging.getLogger("slotserve.controller")


class ControllerCore:
    def __init__(self, store, *, app: str = "slotserve", bundle: str | None = None,
                 clock: Callable[[], float] = time.time, post: Callable[[str, dict], Any] | None = None,
                 actor: str = "controller", force_bundle: bool = False, defer_writes: bool = False):
        self.store = store
        # defer_writes: ledger rows and aliases are queued and flushed (`flush`) right
        # after the replicas were told, so a rollback does not wait on the disk.
        self.saved = StateStore(store.registry, app, actor, defer_writes=defer_writes)
        self.on_rollback: Callable[[str], Any] = lambda trigger: None   # metrics hook
        self.app = app
        self.clock = clock
        self.post = post or (lambda url, body: None)
        self.actor = actor
        self.replicas = ReplicaTracker(clock)
        self.windows = WindowSet(("live", "candidate"), now=clock())
        self.rated = RatedOnce()   # feedback ids seen from any replica: a response counts once
        self.state, self.rollout_spec, self.rollout = self.saved.load()
        self.state = self._restore(bundle, force_bundle)
        if self.rollout is not None:
            self._reset_windows()

    # ------------------------------------------------------------ persistence

    def _restore(self, bundle: str | None, force: bool) -> DesiredState:
        state = self.state
        if bundle:
            rec = self.resolve(bundle)
            t = tr.seed(state, SlotRef(rec.ref, rec.digest), bundle, force)
            if t is not None:
                self._record(t, self.actor)
                state = replace(state, reason=t.reason, **t.changes)
        if state.served_name is None and state.live is not None:
            state = replace(state, served_name=state.live.name)
        state = replace(state, version=state.version + 1, updated_at=self.clock())
        self.saved.save(state, self.rollout_spec, self.rollout)
        return state

    def flush(self) -> None:
        """Run the queued registry writes in order (the actor calls it off the loop)."""
        self.saved.flush()

    @property
    def pending_writes(self) -> bool:
        return self.saved.pending

    def resolve(self, ref: str):
        """The registry row of `ref`; a ControlError (404) naming what exists when there is none."""
        from slotserve.bundles.manifest import BundleError
        try:
            return self.store.resolve(ref)
        except BundleError as exc:
            raise ControlError(404, str(exc), "bundle_not_found") from None

    def _ledger(self, action: str, bundle: str | None, *, from_: str | None = None, to: str | None = None,
                reason: str = "", metrics: dict | None = None, actor: str | None = None) -> None:
        self.saved.record(LedgerRow(action, bundle, from_, to, reason, metrics), actor or self.actor)

    def _record(self, t: Transition, actor: str) -> None:
        for row in t.ledger:
            self.saved.record(row, actor)

    def _commit(self, t: Transition, actor: str) -> DesiredState:
        self._record(t, actor)
        return self._set(t.reason, **t.changes)

    def _set(self, reason: str, **changes) -> DesiredState:
        self.state = replace(self.state, version=self.state.version + 1, reason=reason,
                             updated_at=self.clock(), **changes)
        # Written before replicas are told, so a restart never undoes a change they applied.
        self.saved.save(self.state, self.rollout_spec, self.rollout)
        return self.state

    # ------------------------------------------------------------ replicas

    def report(self, replica_id: str, status: dict, events: list | None = None) -> DesiredState:
        self.replicas.report(replica_id, status)
        for ev in events or ():
            self._ingest(ev)
        return self.state

    def forget(self, replica_id: str) -> None:
        self.replicas.forget(replica_id)

    def active_replicas(self) -> list[ReplicaInfo]:
        return self.replicas.active()

    def convergence(self, version: int, loaded: bool = True) -> tuple[bool, list[str]]:
        return self.replicas.convergence(version, loaded)

    def _ingest(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "request":
            o = RequestOutcome(**ev["outcome"])
            self.windows.record(o)
            if o.oom and o.slot == "candidate":
                self._oom(o)
        elif kind == "feedback":
            w = self.windows.windows.get(ev.get("slot"))
            if w is not None and (ev.get("id") is None or self.rated.first(ev["id"])):
                w.record_feedback(ev["positive"], ev.get("bundle"))
        elif kind == "shadow":
            w = self.windows.windows.get("candidate")
            if w is not None and (w.bundle is None or w.bundle == ev.get("bundle")):
                w.record_shadow(ShadowDiff(**ev["diff"]))
        elif kind == "oom":
            self._oom(None, ev)

    def _oom(self, outcome: RequestOutcome | None, detail: dict | None = None) -> None:
        if (detail or {}).get("phase") == "load":
            return  # a failed load: the replica reports the error, _converge reverts it
        if self.rollout is not None and self.rollout.active:
            self.rollout, events = ro.on_oom(self.rollout, self.clock(), detail or {})
            self._apply_events(events)
        elif self.state.candidate is not None and (detail or {}).get("released"):
            self._set("candidate released after out of memory", **released())

    # ------------------------------------------------------------ admin operations

    def _refuse_during_rollout(self, what: str = "is in progress") -> None:
        if self.rollout is not None and self.rollout.active:
            raise ControlError(409, f"a rollout of {self.rollout.candidate} {what} "
                                    f"(phase {self.rollout.phase}); abort or promote it first",
                               "rollout_in_progress")

    def load(self, ref: str, *, actor: str, evict_previous: bool = False) -> DesiredState:
        self._refuse_during_rollout()
        rec = self.resolve(ref)
        # a load never changes live; it is refused while a replica lacks the live it has to
        # keep serving beside the candidate (a load there would compete with its retry)
        tr.check_warm(self.state.live, self.replicas.recent(), f"load of {rec.ref}")
        return self._commit(tr.load(self.state, SlotRef(rec.ref, rec.digest), actor=actor,
                                    evict_previous=evict_previous), actor)

    def unload_failed(self, ref: str, errors: list[str]) -> DesiredState:
        self._ledger("load", ref, reason="load failed, candidate released: " + "; ".join(errors)[:1500])
        return self._set(f"load of {ref} failed", **released())

    def promote(self, *, actor: str, reason: str = "") -> DesiredState:
        tr.check_warm(self.state.candidate, self.replicas.recent(), "promote")
        if self.rollout is not None and self.rollout.active:
            self.rollout, events = ro.promote(self.rollout, self.clock(), f"{reason} (by {actor})".strip())
            self._apply_events(events, actor=actor)
            return self.state
        return self._commit(tr.promote(self.state, reason or "manual promote"), actor)

    def rollback(self, *, actor: str, reason: str = "", trigger: str = "manual",
                 metrics: dict | None = None) -> DesiredState:
        """previous -> live (the old live is kept warm as previous: rolling forward again
        is the same O(1) swap); the candidate is released and an active rollout aborted,
        in the same change (`slotserve.control.transitions.rollback`)."""
        t, rollout = tr.rollback(self.state, self.rollout, self.clock(), reason=reason,
                                 trigger=trigger, metrics=metrics)
        tr.check_warm(t.changes.get("live"), self.replicas.recent(), "rollback")
        self.rollout = rollout
        self.on_rollback(trigger)
        return self._commit(t, actor)

    def start_rollout(self, spec_dict: dict, *, actor: str) -> DesiredState:
        self._refuse_during_rollout("is already in progress")
        try:
            spec = RolloutSpec.parse(spec_dict)
        except SpecError as exc:
            raise ControlError(400, str(exc), "invalid_spec") from None
        rec = self.resolve(spec.bundle)
        self.check_eval_gate(spec_dict, rec)
        if self.state.live and rec.digest == self.state.live.digest:
            raise ControlError(409, f"{rec.ref} is already live", "already_live")
        if self.state.candidate is None or self.state.candidate.digest != rec.digest:
            raise ControlError(409, f"{rec.ref} is not staged: load it first "
                                    f"(the API does this for you)", "not_staged")
        spec = RolloutSpec.parse({**spec.to_dict(), "bundle": rec.ref})
        live = self.state.live.ref if self.state.live else None
        self.rollout_spec = spec.to_dict()
        self.rollout = ro.start(spec, self.clock(), live=live, salt=uuid.uuid4().hex[:12])
        self._ledger("rollout_start", rec.ref, from_=live, to=rec.ref, reason=f"{spec.strategy} rollout by {actor}",
                     metrics={"spec": self.rollout_spec}, actor=actor)
        self._reset_windows()
        return self._set(f"rollout of {rec.ref} started", weights=dict(self.rollout.weights),
                         mirror_fraction=self.rollout.mirror_fraction, salt=self.rollout.salt,
                         sticky_key=spec.sticky_key,
                         safety=spec.safety.to_dict() if spec.safety else None,
                         rollout_phase=self.rollout.phase, window_epoch=self.state.window_epoch + 1)

    def check_eval_gate(self, spec_dict: dict, rec) -> None:
        """400 now for an eval_score guard on a bundle with no eval set, rather than a
        rollout that starts and then aborts in the background."""
        if not RolloutSpec.parse(spec_dict).has_eval_gate:
            return
        try:
            load_eval(self.store.path_of(rec.name, rec.version))
        except EvalError as exc:
            raise ControlError(400, f"{rec.ref}: {exc}", "invalid_spec") from None

    def abort(self, *, actor: str, reason: str = "") -> DesiredState:
        if self.rollout is not None and self.rollout.active:
            self.rollout, events = ro.abort(self.rollout, reason or f"aborted by {actor}", self.clock())
            self._apply_events(events, actor=actor)
            return self.state
        return self._commit(tr.release(self.state, reason or f"candidate released by {actor}"), actor)

    def resume(self, *, actor: str) -> DesiredState:
        if self.rollout is None:
            raise ControlError(409, "no rollout to resume", "no_rollout")
        try:
            self.rollout, events = ro.resume(self.rollout, self.clock())
        except ro.RolloutError as exc:
            raise ControlError(409, str(exc), "not_paused") from None
        self._apply_events(events, actor=actor)
        return self.state

    def eval_result(self, candidate_score: float, live_score: float, detail: dict) -> None:
        if self.rollout is None or self.rollout.phase != "pending_eval":
            return
        self.rollout, events = ro.on_eval(self.rollout, candidate_score, live_score, self.clock(),
                                          int(detail.get("items", 1)))
        self._ledger("eval", self.rollout.candidate, reason="eval gate",
                     metrics={"candidate.eval_score": candidate_score, "live.eval_score": live_score,
                              **detail})
        self._apply_events(events)

    def eval_failed(self, message: str) -> None:
        """The eval gate could not run (no answer, an error): the rollout it gates is aborted."""
        if self.rollout is not None and self.rollout.phase == "pending_eval":
            self.rollout, events = ro.abort(self.rollout, f"eval gate failed: {message}", self.clock(),
                                            trigger="eval")
            self._apply_events(events)

    # ------------------------------------------------------------ the rollout loop

    def tick(self) -> list:
        if self.rollout is None or self.rollout.phase != "running":
            return []
        now = self.clock()
        self.rollout, events = ro.tick(self.rollout, self.windows.snapshot(now), now)
        self._apply_events(events)
        return events

    def _reset_windows(self) -> None:
        self.windows.reset(self.clock(), {
            "live": self.state.live.ref if self.state.live else None,
            "candidate": self.rollout.candidate if self.rollout else None})

    def _apply_events(self, events: list, actor: str | None = None) -> None:
        who = actor or self.actor
        for ev in events:
            t = tr.rollout_event(ev, self.rollout, self.state)
            if t is not None:
                self._commit(t, who)
            if isinstance(ev, ro.StepAdvanced):
                self._reset_windows()
            elif isinstance(ev, ro.RolledBack):
                self.on_rollback("oom" if "out of memory" in ev.reason else "guard")
                self._alert(self.rollout.spec.alert_webhook, ro.event_dict(ev))
            elif isinstance(ev, ro.Alerted):
                self._alert(ev.webhook, ro.event_dict(ev))

    def _alert(self, url: str | None, event: dict) -> None:
        if not url:
            return
        body = {"app": self.app, "live": self.state.live.ref if self.state.live else None,
                **jsonable(event)}
        try:
            self.post(url, body)
        except Exception as exc:
            log.error("alert webhook %s failed: %s", url, exc)

    # ------------------------------------------------------------ views

    def rollout_status(self) -> dict:
        """GET /admin/rollout. `now` is the controller's clock (epoch seconds), the one the
        rollout's times are on: `now - step_started_at` is how long the step has run,
        whatever the client's clock says."""
        now = self.clock()
        if self.rollout is None:
            return {"phase": None, "candidate": self.state.candidate.ref if self.state.candidate else None,
                    "weights": dict(self.state.weights), "now": now}
        snapshot = self.windows.snapshot(now)
        out = ro.describe(self.rollout, snapshot, now)
        out["windows"] = {s: w.to_dict() for s, w in snapshot.items()}
        # `live` is what serves now (the candidate, after a promote); `baseline` is the live
        # the rollout started from and compared the candidate against.
        out.update(baseline=out["live"], live=self.state.live.ref if self.state.live else None,
                   step_started_at=self.rollout.step_started_at, now=now)
        return jsonable(out)

    def admin_state(self) -> dict:
        s = self.state
        return jsonable({
            "app": self.app, "version": s.version,
            "desired": {slot: (asdict(s.slot(slot)) if s.slot(slot) else None) for slot in SLOT_NAMES},
            "weights": dict(s.weights), "mirror_fraction": s.mirror_fraction,
            "served_name": s.served_name, "rollout_phase": s.rollout_phase, "reason": s.reason, "updated_at": s.updated_at,
            "replicas": [asdict(r) for r in sorted(self.replicas.active(), key=lambda r: r.id)],
        })

    def ledger(self, limit: int = 50, bundle: str | None = None) -> list[dict]:
        return [e.to_dict() for e in self.store.registry.ledger(limit, bundle)]

