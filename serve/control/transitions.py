"""The controller's decisions, as pure functions: an admin operation on the desired state
-> a `Transition` (the fields to change and the ledger rows to write), or a
`ControlError` that says why it is refused and what to do instead.

No registry, no clock of their own, no replicas: `slotserve.control.core.ControllerCore`
resolves bundle refs, applies the transition (a new desired-state version, persisted
before replicas are told) and writes the rows. Rollout steps are decided by
`slotserve.rollout.machine`; `rollout_event` says what each of its events does to the desired
state (docs/rollout.md, events -> effects).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from slotserve.control.state import DesiredState, ReplicaInfo, SlotRef
from slotserve.rollout import machine as ro


class ControlError(Exception):
    """An admin request refused; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


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


def seed(state: DesiredState, bundle: SlotRef, asked: str, force: bool) -> Transition | None:
    """`serve --bundle` (or a Serve config's `bundle`) at start: it becomes live when the
    persisted state has none; with `force` (an explicit `serve --bundle`) it replaces a
    different persisted live, which is kept warm as previous. Otherwise nothing."""
    why = f"serve --bundle {asked}" if force else f"initial live {asked}"
    if state.live is None:
        return Transition(why, {"live": bundle},
                          (LedgerRow("load", bundle.ref, to=bundle.ref, reason=f"initial live ({asked})"),))
    if force and state.live.digest != bundle.digest:
        staged = state.candidate if state.candidate and state.candidate.digest != bundle.digest else None
        return Transition(why, {"live": bundle, "previous": state.live, "candidate": staged},
                          (LedgerRow("promote", bundle.ref, from_=state.live.ref, to=bundle.ref,
                                     reason=f"{why} replaced the persisted live"),))
    return None


def load(state: DesiredState, bundle: SlotRef, *, actor: str, evict_previous: bool = False) -> Transition:
    """Stage `bundle` as the candidate (all traffic stays on live). With `evict_previous`
    the replicas may drop previous to make room, so the state stops advertising it."""
    if state.live and bundle.digest == state.live.digest:
        raise ControlError(409, f"{bundle.ref} is already live", "already_live")
    rows = [LedgerRow("load", bundle.ref, to=bundle.ref, reason=f"staged as candidate (by {actor})")]
    changes = {"candidate": bundle, "weights": {"live": 100.0}, "mirror_fraction": 0.0,
               "evict_previous": evict_previous, "rollout_phase": None}
    if evict_previous and state.previous is not None:
        rows.append(LedgerRow("evict", state.previous.ref, from_=state.previous.ref,
                              reason=f"evicted to make room for {bundle.ref} (by {actor})"))
        changes["previous"] = None
    return Transition(f"load {bundle.ref}", changes, tuple(rows))


def promote(state: DesiredState, reason: str, metrics: dict | None = None) -> Transition:
    """candidate -> live, the old live kept warm as previous."""
    if state.candidate is None:
        raise ControlError(409, "nothing to promote: no candidate is staged "
                                "(POST /admin/load {\"bundle\": REF} first)", "no_candidate")
    old, new = state.live, state.candidate
    return Transition(f"promote {new.ref}",
                      {"live": new, "previous": old, **released(), "window_epoch": state.window_epoch + 1},
                      (LedgerRow("promote", new.ref, from_=old.ref if old else None, to=new.ref,
                                 reason=reason, metrics=metrics),))


def release(state: DesiredState, reason: str) -> Transition:
    """Drop a staged candidate outside a rollout (`rollout abort` with no rollout)."""
    if state.candidate is None:
        raise ControlError(409, "nothing to abort: no rollout is active and no candidate is staged",
                           "nothing_to_abort")
    return Transition("candidate released", released(), (LedgerRow("abort", state.candidate.ref, reason=reason),))


def rollback(state: DesiredState, rollout: ro.RolloutState | None, now: float, *,
             reason: str, trigger: str, metrics: dict | None = None
             ) -> tuple[Transition, ro.RolloutState | None]:
    """A manual rollback: previous -> live (the old live stays warm as previous) and the
    candidate released, in one change. An active rollout is aborted; a candidate merely
    staged is released too, as an automatic rollback releases it: it was staged against
    the live being rolled back, and left in the desired state every replica (a new or
    restarted one included) would load it again. Without a warm previous it is refused
    and nothing changes. Returns the transition and the (aborted) rollout."""
    active = rollout is not None and rollout.active
    if state.previous is None and active and state.live is not None:
        # The rollout's baseline is still live (a rollout promotes only at its end): what
        # an on-call engineer pressing rollback wants back is exactly that, so the rollout
        # is aborted to it in this one change rather than refused.
        why = (f"rollback with no previous warm: rollout of {rollout.candidate} aborted, "
               f"all traffic back to the baseline {state.live.ref}" + (f": {reason}" if reason else ""))
        rollout, _ = ro.abort(rollout, why, now)
        return Transition(why, {**released(), "rollout_phase": rollout.phase,
                                "window_epoch": state.window_epoch + 1},
                          (LedgerRow("abort", rollout.candidate, from_=rollout.candidate, to=state.live.ref,
                                     reason=why, metrics={"trigger": trigger, **(metrics or {})}),)), rollout
    if state.previous is None:
        hint = (f"; to release the staged {state.candidate.ref} use `slotserve rollout abort`"
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


def load_failure(ref: str, errors: list[str]) -> ControlError:
    """What an admin call answers when loading `ref` failed on replicas (`errors`, one per
    replica): 422 when the stored bundle failed its digest verification (the bundle, not
    the server, is at fault: publish it again), 507 when it does not fit, else 500."""
    status = (422 if any("failed verification" in e for e in errors)
              else 507 if any("fit" in e for e in errors) else 500)
    return ControlError(status, f"loading {ref} failed on {len(errors)} replica(s): " + "; ".join(errors),
                        "load_failed")


def _held(r: ReplicaInfo) -> dict[str, dict]:
    """slot -> {"ref", "digest"} of what replica `r` last reported holding (its SlotManager state)."""
    slots = r.slots.get("slots") if isinstance(r.slots, dict) else None
    return {n: i for n, i in (slots or {}).items() if isinstance(i, dict) and i.get("digest")}


def check_warm(new_live: SlotRef | None, replicas: list[ReplicaInfo], what: str) -> None:
    """Refuse (409, before anything changes) a change that makes `new_live` live while a
    serving replica does not hold it in any slot: that replica would have no loaded live
    to answer with once it swaps (a rollback or promote is a pointer swap only when the
    bundle is already there). `replicas`: those heard from recently, as they reported.
    A replica that holds no live yet is still starting: it loads whatever the state says."""
    if new_live is None:
        return
    for r in sorted(replicas, key=lambda r: r.id):
        held = _held(r)
        if "live" not in held or any(i["digest"] == new_live.digest for i in held.values()):
            continue
        why = ", ".join(f"{n} " + (held[n].get("ref") or held[n]["digest"][:12] if n in held else "empty")
                        for n in ("live", "previous", "candidate"))
        if r.loading:
            why += f"; loading {r.loading}"
        if r.error:
            why += f"; last error: {r.error.get('message')}"
        raise ControlError(409, f"{what} refused, nothing changed: replica {r.id} does not hold "
                                f"{new_live.ref} loaded (slots: {why}), so it would have no live "
                                f"to answer with", "not_warm")


def rollout_event(ev: ro.Event, rollout: ro.RolloutState, state: DesiredState) -> Transition | None:
    """What one event of the rollout machine does to the desired state; `rollout` is the
    machine's state after the events. Side effects (windows reset, webhooks, metrics)
    are the caller's."""
    cand, phase = rollout.candidate, rollout.phase
    if isinstance(ev, ro.StepAdvanced):
        return Transition(f"rollout step {ev.index}",
                          {"weights": dict(ev.weights), "mirror_fraction": ev.mirror_fraction,
                           "rollout_phase": phase, "window_epoch": state.window_epoch + 1},
                          (LedgerRow("rollout_step", cand, reason=f"step {ev.index}: {ev.weights}",
                                     metrics={"weights": ev.weights, "mirror_fraction": ev.mirror_fraction}),))
    if isinstance(ev, ro.Promoted):
        t = promote(state, f"rollout promoted ({ev.reason})")
        return replace(t, changes={**t.changes, "rollout_phase": phase})
    if isinstance(ev, (ro.RolledBack, ro.Aborted)):
        action = "rollback" if isinstance(ev, ro.RolledBack) else "abort"
        metrics = {"trigger": "guard" if action == "rollback" else ev.trigger, **(getattr(ev, "metrics", None) or {})}
        return Transition(f"rollout {phase}: {ev.reason}",
                          {**released(), "rollout_phase": phase, "window_epoch": state.window_epoch + 1},
                          (LedgerRow(action, cand, from_=cand, to=state.live.ref if state.live else None,
                                     reason=f"rollout {action}: {ev.reason}", metrics=metrics),))
    if isinstance(ev, ro.Alerted):
        return Transition(f"alert: {ev.reason}", {"rollout_phase": phase},
                          (LedgerRow("alert", cand, reason=ev.reason, metrics=ev.metrics),))
    if isinstance(ev, ro.Resumed):   # a new version too, so the unpaused rollout is persisted
        return Transition("rollout resumed", {"rollout_phase": phase},
                          (LedgerRow("rollout_step", cand, reason="resumed after alert"),))
    return None  # Started; EvalGated is recorded by the caller with the scores
