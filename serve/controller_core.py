"""The controller core: desired state, replica reports, admin operations and the rollout
loop, in plain Python (tested without Ray; `slotserve.controller.SlotController` is the
async actor shell around it).

`ControllerCore`

* persists the desired state in the registry (aliases `@live/@previous/@candidate` +
  the state row `serve:<app>`), so a restart of the whole app comes back the same;
* collects what replicas report (applied version, slots, request outcomes) and says
  when they have converged on a version;
* drives the rollout: `tick()` feeds the merged windows to `slotserve.rollout.tick`
  and turns events into state changes, ledger rows and alert webhooks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from slotserve import rollout as ro
from slotserve.desired_state import SLOTS, DesiredState, ReplicaInfo, SlotRef
from slotserve.shadow import ShadowDiff
from slotserve.spec import RolloutSpec, SpecError
from slotserve.window import RequestOutcome, WindowSet

log = logging.getLogger("slotserve.controller")

REPLICA_TTL_S = 10.0       # a replica not heard from for this long is gone
CONVERGE_TTL_S = 3.0       # convergence waits only for replicas heard from this recently
                           # (a serving replica reports at least every second)


class ControlError(Exception):
    """An admin request refused; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# ---------------------------------------------------------------- decisions (pure)

@dataclass(frozen=True)
class LedgerRow:
    """One ledger record an operation writes (`Registry.record`'s arguments, less the actor)."""
    action: str
    bundle: str | None
    from_: str | None = None
    to: str | None = None
    reason: str = ""
    metrics: dict | None = None


@dataclass(frozen=True)
class Transition:
    """A decided change of the desired state: the fields to replace and the ledger rows."""
    reason: str
    changes: dict
    ledger: tuple[LedgerRow, ...] = ()


def released() -> dict:
    """The desired-state fields of "no candidate": all traffic on live, nothing mirrored,
    no eviction pending. Every path that drops the candidate sets all of them."""
    return {"candidate": None, "weights": {"live": 100.0}, "mirror_fraction": 0.0, "evict_previous": False}


def rollback_transition(state: DesiredState, rollout: ro.RolloutState | None, now: float, *,
                        reason: str, trigger: str, metrics: dict | None = None
                        ) -> tuple[Transition, ro.RolloutState | None]:
    """A manual rollback, decided: previous -> live (the old live stays warm as previous)
    and the candidate released, in one change. An active rollout is aborted; a candidate
    merely staged is released too, as an automatic rollback releases it: it was staged
    against the live being rolled back, and left in the desired state every replica
    (a new or restarted one included) would load it again. Without a warm previous it is
    refused and nothing changes. Returns the transition and the (aborted) rollout."""
    active = rollout is not None and rollout.active
    if state.previous is None:
        hint = (f"; to stop the rollout of {rollout.candidate} use `slotserve rollout abort`" if active
                else f"; to release the staged {state.candidate.ref} use `slotserve rollout abort`"
                if state.candidate else "")
        raise ControlError(409, "nothing to roll back to: no previous bundle is warm" + hint, "no_previous")
    old, new = state.live, state.previous
    why = f"rollback to {new.ref}" + (f": {reason}" if reason else "")
    changes = {"live": new, "previous": old, **released(), "window_epoch": state.window_epoch + 1}
    rows = []
    cand = rollout.candidate if active else state.candidate.ref if state.candidate else None
    if active:
        rollout, _ = ro.abort(rollout, why, now)
        changes["rollout_phase"] = rollout.phase
    if cand is not None:
        rows.append(LedgerRow("abort", cand, from_=cand, to=new.ref, metrics={"trigger": trigger},
                              reason=("rollout aborted, " if active else "") + f"candidate released by {why}"))
    rows.append(LedgerRow("rollback", new.ref, from_=old.ref if old else None, to=new.ref,
                          reason=reason or trigger, metrics={"trigger": trigger, **(metrics or {})}))
    return Transition(why, changes, tuple(rows)), rollout


class ControllerCore:
    def __init__(self, store, *, app: str = "slotserve", bundle: str | None = None,
                 clock: Callable[[], float] = time.time, post: Callable[[str, dict], Any] | None = None,
                 actor: str = "controller", force_bundle: bool = False, defer_writes: bool = False):
        self.store = store
        # defer_writes: registry writes (ledger rows, aliases; ~20 ms each with fsync) are
        # queued and flushed right after the replicas were told, so a rollback is pushed
        # without waiting on the disk. The JSON state row is still written first.
        self.defer_writes = defer_writes
        self._pending: list[Callable[[], Any]] = []
        self.on_rollback: Callable[[str], Any] = lambda trigger: None   # metrics hook
        self.app = app
        self.clock = clock
        self.post = post or (lambda url, body: None)
        self.actor = actor
        self.state_key = f"serve:{app}"   # the registry's state row for this app
        self.replicas: dict[str, ReplicaInfo] = {}
        self.windows = WindowSet(("live", "candidate"), now=clock())
        self.rollout: ro.RolloutState | None = None
        self.rollout_spec: dict | None = None
        self.state = self._restore(bundle, force_bundle)
        if self.rollout is not None:
            self._reset_windows()

    # ------------------------------------------------------------ persistence

    def _restore(self, bundle: str | None, force: bool) -> DesiredState:
        state = DesiredState()
        # An unreadable registry raises here: starting empty would forget live and previous.
        saved = self.store.registry.get_state(self.state_key)
        if saved is not None:
            try:
                state = DesiredState.from_dict(saved["state"])
                self.rollout_spec = saved.get("rollout_spec")
                if saved.get("rollout"):
                    # Resume where it was (wall-clock times); the windows start empty,
                    # so the current step re-collects its samples before advancing.
                    self.rollout = ro.RolloutState.from_dict(saved["rollout"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable state %s: %s", self.state_key, exc)
                state = DesiredState()
        if bundle:
            rec = self._resolve(bundle)
            if state.live is None:
                state = replace(state, live=SlotRef(rec.ref, rec.digest), reason=f"serve --bundle {bundle}")
                self._ledger("load", rec.ref, to=rec.ref, reason=f"initial live ({bundle})")
            elif force and state.live.digest != rec.digest:
                # An explicit `serve --bundle` that differs from the persisted live: it
                # becomes live and the old live is kept warm as previous. (A Serve
                # config's `bundle` only seeds an empty state.)
                state = replace(state, previous=state.live, live=SlotRef(rec.ref, rec.digest),
                                candidate=None if state.candidate and state.candidate.digest == rec.digest
                                else state.candidate, reason=f"serve --bundle {bundle}")
                self._ledger("promote", rec.ref, from_=state.previous.ref, to=rec.ref,
                             reason=f"serve --bundle {bundle} replaced the persisted live")
        if state.served_name is None and state.live is not None:
            state = replace(state, served_name=state.live.name)
        state = replace(state, version=state.version + 1, updated_at=self.clock())
        self._persist(state)
        return state

    def _persist(self, state: DesiredState) -> None:
        # Written before replicas are told, so a restart never undoes a change they applied.
        self.store.registry.put_state(self.state_key, {
            "state": state.to_dict(), "rollout_spec": self.rollout_spec,
            "rollout": self.rollout.to_dict() if self.rollout else None})
        self._write(lambda: self._sync_aliases(state))

    def _write(self, fn: Callable[[], Any]) -> None:
        if self.defer_writes:
            self._pending.append(fn)
        else:
            fn()

    def flush(self) -> None:
        """Run the queued registry writes in order (the actor calls it off the loop)."""
        while self._pending:
            batch, self._pending = self._pending, []
            for fn in batch:
                try:
                    fn()
                except Exception as exc:
                    log.error("registry write failed: %s", exc)

    def _sync_aliases(self, state: DesiredState) -> None:
        """`name@live|previous|candidate` follow the desired state (so refs like
        support-bot@previous resolve, and `bundle show` says where a version serves)."""
        reg = self.store.registry
        holders = reg.aliases()
        why = state.reason or "state change"
        for slot in SLOTS:
            want = state.slot(slot)
            for name, aliases in holders.items():
                if slot in aliases and (want is None or name != want.name):
                    reg.clear_alias(name, slot, self.actor, reason=why)
            if want is not None and holders.get(want.name, {}).get(slot) != want.version:
                reg.set_alias(want.name, slot, want.version, self.actor, reason=why)

    def _resolve(self, ref: str):
        from slotserve.bundles.manifest import BundleError
        try:
            return self.store.resolve(ref)
        except BundleError as exc:
            raise ControlError(404, str(exc), "bundle_not_found") from None

    def _ledger(self, action: str, bundle: str | None, *, from_: str | None = None, to: str | None = None,
                reason: str = "", metrics: dict | None = None, actor: str | None = None) -> None:
        row = (action, actor or self.actor, bundle, from_, to, reason,
               _jsonable(metrics) if metrics else None)

        def write():
            try:
                self.store.registry.record(*row)
            except Exception as exc:  # the ledger must not take serving down
                log.error("ledger write failed (%s %s): %s", action, bundle, exc)
        self._write(write)

    def _commit(self, t: Transition, actor: str) -> DesiredState:
        for row in t.ledger:
            self._ledger(row.action, row.bundle, from_=row.from_, to=row.to, reason=row.reason,
                         metrics=row.metrics, actor=actor)
        return self._set(t.reason, **t.changes)

    def _set(self, reason: str, **changes) -> DesiredState:
        self.state = replace(self.state, version=self.state.version + 1, reason=reason,
                             updated_at=self.clock(), **changes)
        self._persist(self.state)
        return self.state

    # ------------------------------------------------------------ replicas

    def report(self, replica_id: str, status: dict, events: list | None = None) -> DesiredState:
        info = self.replicas.get(replica_id) or ReplicaInfo(replica_id)
        self.replicas[replica_id] = info
        info.seen = self.clock()
        for k in ("node", "applied", "routed", "ready", "slots", "error", "inflight", "loading"):
            if k in status:
                setattr(info, k, status[k])
        for ev in events or ():
            self._ingest(ev)
        return self.state

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def _ingest(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "request":
            o = RequestOutcome(**ev["outcome"])
            self.windows.record(o)
            if o.oom and o.slot == "candidate":
                self._oom(o)
        elif kind == "feedback":
            w = self.windows.windows.get(ev.get("slot"))
            if w is not None:
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

    def active_replicas(self) -> list[ReplicaInfo]:
        now = self.clock()
        for rid in [r.id for r in self.replicas.values() if now - r.seen > REPLICA_TTL_S]:
            del self.replicas[rid]
        return list(self.replicas.values())

    def convergence(self, version: int, loaded: bool = True) -> tuple[bool, list[str]]:
        """(all serving replicas applied `version`, errors reported for it). With
        loaded=False a replica still loading a candidate counts once it routes as
        `version` says (a rollback does not wait for an unrelated load)."""
        now = self.clock()
        reps = [r for r in self.active_replicas()
                if (r.ready or r.applied >= 0) and now - r.seen <= CONVERGE_TTL_S]
        errors = [f"{r.id}: {r.error['message']}" for r in reps
                  if r.error and r.error.get("version", -1) >= version]
        done = bool(reps) and all((r.applied if loaded else max(r.applied, r.routed)) >= version
                                  for r in reps if not r.error or r.error.get("version", -1) < version)
        return done, errors

    # ------------------------------------------------------------ admin operations

    def load(self, ref: str, *, actor: str, evict_previous: bool = False) -> DesiredState:
        if self.rollout is not None and self.rollout.active:
            raise ControlError(409, f"a rollout of {self.rollout.candidate} is in progress "
                                    f"(phase {self.rollout.phase}); abort or promote it first",
                               "rollout_in_progress")
        rec = self._resolve(ref)
        if self.state.live and rec.digest == self.state.live.digest:
            raise ControlError(409, f"{rec.ref} is already live", "already_live")
        self._ledger("load", rec.ref, to=rec.ref, reason=f"staged as candidate (by {actor})",
                     actor=actor)
        changes = {}
        if evict_previous and self.state.previous is not None:
            # The replicas drop previous to make room: the desired state must stop
            # advertising it as the warm rollback target.
            self._ledger("evict", self.state.previous.ref, from_=self.state.previous.ref,
                         reason=f"evicted to make room for {rec.ref} (by {actor})", actor=actor)
            changes["previous"] = None
        return self._set(f"load {rec.ref}", candidate=SlotRef(rec.ref, rec.digest),
                         weights={"live": 100.0}, mirror_fraction=0.0,
                         evict_previous=evict_previous, rollout_phase=None, **changes)

    def unload_failed(self, ref: str, errors: list[str]) -> DesiredState:
        self._ledger("load", ref, reason="load failed, candidate released: " + "; ".join(errors)[:1500])
        return self._set(f"load of {ref} failed", **released())

    def promote(self, *, actor: str, reason: str = "") -> DesiredState:
        if self.rollout is not None and self.rollout.active:
            self.rollout, events = ro.promote(self.rollout, self.clock(), f"{reason} (by {actor})".strip())
            self._apply_events(events, actor=actor)
            return self.state
        if self.state.candidate is None:
            raise ControlError(409, "nothing to promote: no candidate is staged "
                                    "(POST /admin/load {\"bundle\": REF} first)", "no_candidate")
        return self._do_promote(actor, reason or "manual promote")

    def _do_promote(self, actor: str, reason: str, metrics: dict | None = None) -> DesiredState:
        old, new = self.state.live, self.state.candidate
        self._ledger("promote", new.ref, from_=old.ref if old else None, to=new.ref,
                     reason=reason, metrics=metrics, actor=actor)
        return self._set(f"promote {new.ref}", live=new, previous=old, candidate=None,
                         weights={"live": 100.0}, mirror_fraction=0.0,
                         window_epoch=self.state.window_epoch + 1, evict_previous=False)

    def rollback(self, *, actor: str, reason: str = "", trigger: str = "manual",
                 metrics: dict | None = None) -> DesiredState:
        """previous -> live (the old live is kept warm as previous: rolling forward again
        is the same O(1) swap); the candidate is released and an active rollout aborted,
        in the same change (`rollback_transition`)."""
        t, self.rollout = rollback_transition(self.state, self.rollout, self.clock(), reason=reason,
                                              trigger=trigger, metrics=metrics)
        self.on_rollback(trigger)
        return self._commit(t, actor)

    def start_rollout(self, spec_dict: dict, *, actor: str) -> DesiredState:
        if self.rollout is not None and self.rollout.active:
            raise ControlError(409, f"a rollout of {self.rollout.candidate} is already in progress "
                                    f"(phase {self.rollout.phase}); abort or promote it first",
                               "rollout_in_progress")
        try:
            spec = RolloutSpec.parse(spec_dict)
        except SpecError as exc:
            raise ControlError(400, str(exc), "invalid_spec") from None
        rec = self._resolve(spec.bundle)
        if self.state.live and rec.digest == self.state.live.digest:
            raise ControlError(409, f"{rec.ref} is already live", "already_live")
        if self.state.candidate is None or self.state.candidate.digest != rec.digest:
            raise ControlError(409, f"{rec.ref} is not staged: load it first "
                                    f"(the API does this for you)", "not_staged")
        spec = RolloutSpec.parse({**spec.to_dict(), "bundle": rec.ref})
        now = self.clock()
        self.rollout_spec = spec.to_dict()
        self.rollout = ro.start(spec, now, live=self.state.live.ref if self.state.live else None,
                                salt=uuid.uuid4().hex[:12])
        self._ledger("rollout_start", rec.ref, from_=self.state.live.ref if self.state.live else None,
                     to=rec.ref, reason=f"{spec.strategy} rollout by {actor}",
                     metrics={"spec": self.rollout_spec}, actor=actor)
        self._reset_windows()
        return self._set(f"rollout of {rec.ref} started", weights=dict(self.rollout.weights),
                         mirror_fraction=self.rollout.mirror_fraction, salt=self.rollout.salt,
                         sticky_key=spec.sticky_key,
                         safety=spec.safety.to_dict() if spec.safety else None,
                         rollout_phase=self.rollout.phase, window_epoch=self.state.window_epoch + 1)

    def abort(self, *, actor: str, reason: str = "") -> DesiredState:
        if self.rollout is not None and self.rollout.active:
            self.rollout, events = ro.abort(self.rollout, reason or f"aborted by {actor}", self.clock())
            self._apply_events(events, actor=actor)
            return self.state
        if self.state.candidate is None:
            raise ControlError(409, "nothing to abort: no rollout is active and no candidate is staged",
                               "nothing_to_abort")
        self._ledger("abort", self.state.candidate.ref, reason=reason or f"candidate released by {actor}",
                     actor=actor)
        return self._set("candidate released", **released())

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
        r = self.rollout
        for ev in events:
            d = ro.event_dict(ev)
            if isinstance(ev, ro.StepAdvanced):
                self._ledger("rollout_step", r.candidate, reason=f"step {ev.index}: {ev.weights}",
                             metrics={"weights": ev.weights, "mirror_fraction": ev.mirror_fraction},
                             actor=who)
                self._set(f"rollout step {ev.index}", weights=dict(ev.weights),
                          mirror_fraction=ev.mirror_fraction, rollout_phase=r.phase,
                          window_epoch=self.state.window_epoch + 1)
                self._reset_windows()
            elif isinstance(ev, ro.Promoted):
                self._do_promote(who, f"rollout promoted ({ev.reason})")
                self._set("rollout promoted", rollout_phase=r.phase)
            elif isinstance(ev, (ro.RolledBack, ro.Aborted)):
                action = "rollback" if isinstance(ev, ro.RolledBack) else "abort"
                metrics = getattr(ev, "metrics", None)
                self._ledger(action, r.candidate, from_=r.candidate,
                             to=self.state.live.ref if self.state.live else None,
                             reason=f"rollout {action}: {ev.reason}",
                             metrics={"trigger": "guard" if action == "rollback" else "manual",
                                      **(metrics or {})}, actor=who)
                self._set(f"rollout {r.phase}: {ev.reason}", **released(), rollout_phase=r.phase,
                          window_epoch=self.state.window_epoch + 1)
                if action == "rollback":
                    self.on_rollback("oom" if "out of memory" in ev.reason else "guard")
                    self._alert(r.spec.alert_webhook, d)
            elif isinstance(ev, ro.Alerted):
                self._ledger("alert", r.candidate, reason=ev.reason, metrics=ev.metrics, actor=who)
                self._alert(ev.webhook, d)
                self._set(f"alert: {ev.reason}", rollout_phase=r.phase)
            elif isinstance(ev, ro.Resumed):
                self._ledger("rollout_step", r.candidate, reason="resumed after alert", actor=who)
            elif isinstance(ev, ro.EvalGated):
                pass  # recorded by eval_result with the scores

    def _alert(self, url: str | None, event: dict) -> None:
        if not url:
            return
        body = {"app": self.app, "live": self.state.live.ref if self.state.live else None,
                **_jsonable(event)}
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
        out.update(step_started_at=self.rollout.step_started_at, now=now)
        return _jsonable(out)

    def admin_state(self) -> dict:
        s = self.state
        return _jsonable({
            "app": self.app, "version": s.version,
            "desired": {slot: (asdict(s.slot(slot)) if s.slot(slot) else None) for slot in SLOTS},
            "weights": dict(s.weights), "mirror_fraction": s.mirror_fraction,
            "served_name": s.served_name, "rollout_phase": s.rollout_phase, "reason": s.reason, "updated_at": s.updated_at,
            "replicas": [asdict(r) for r in sorted(self.active_replicas(), key=lambda r: r.id)],
        })

    def ledger(self, limit: int = 50, bundle: str | None = None) -> list[dict]:
        return [e.to_dict() for e in self.store.registry.ledger(limit, bundle)]


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                 else (sorted(o) if isinstance(o, (set, frozenset)) else str(o))))
