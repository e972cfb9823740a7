"""One serving replica without Ray or HTTP: converge the slots to the desired state, report back.

A `Replica` owns a SlotManager, its `Outbox` (what the controller hears next), its
`EvalGate` and two background loops:

* watch: long-polls the controller for the desired state and applies it — promote and
  rollback are O(1) swaps; only a bundle not yet in any slot is loaded (in a thread,
  so live keeps serving while a candidate loads);
* report: sends the applied version, the slots, and the queued events (request
  outcomes for the controller's rollout windows, feedback, shadow diffs, OOM events)
  every `report_interval_s`, and a snapshot of its Prometheus metrics
  (slotserve.metrics) at most every `PUSH_S`, so a scrape on any replica shows this one.

`apply(d)` makes the slots match `d` and routes requests by its weights: O(1) swaps
first (promote, rollback), then releases, then loads. While a load runs, the watch loop
calls `_swap_now` so a rollback, promote or weight change never waits for it.

Nothing here may block the event loop, which serves every request of the replica:
* swaps are serialized by `_swap_lock` and read the slots again under it, so a swap is
  never done twice (a second rollback would roll forward);
* a rollback to a parked previous waits for the slot manager's memory lock, so it runs
  in a thread (`SlotManager.rollback_async`); it aborts an in-flight candidate load,
  which is not an error: the newer desired state is applied next (loading the
  candidate again if it still names one).

Requests reach the slots through the request path the HTTP edge attaches
(`attach(handler)`, slotserve.api.handler.Handler): it routes by this replica's
`routing`, sends its outcomes to the outbox, and its in-flight count is reported. The
Ray deployment (slotserve.app) is a thin shell around this; tests drive it with an
in-process controller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from slotserve import SLOT_NAMES
from slotserve.control.state import HEARTBEAT_S, DesiredState, jsonable
from slotserve.metrics import ReplicaMetrics, read_slots, render
from slotserve.replica.backend import Routing, SlotsBackend
from slotserve.replica.eval_gate import EvalGate
from slotserve.replica.outbox import Outbox
from slotserve.replica.settings import Settings, make_manager
from slotserve.rollout import ACTIVE
from slotserve.rollout.safety import SafetyFilter
from slotserve.slots import LoadAborted

log = logging.getLogger("slotserve.replica")

METRICS_WAIT_S = 2.0   # a scrape waits this long for the other replicas' snapshots
RETRY_FIRST_S = 0.5     # a failed apply (a bundle that did not load) is retried after this,
RETRY_CAP_S = 30.0      # doubling each time up to this: a fixed file is picked up by itself


def retry_delay(failures: int, first: float = RETRY_FIRST_S, cap: float = RETRY_CAP_S) -> float:
    """Seconds to wait before retrying after `failures` failed attempts in a row (>= 1):
    first, 2*first, 4*first, ... capped at `cap`."""
    return min(cap, first * 2 ** min(max(failures, 1) - 1, 30))


class Replica:
    """One replica: a slot manager, the outbox and eval gate, the watch and report loops."""

    def __init__(self, settings: Settings, controller, *, mgr=None, replica_id: str | None = None,
                 metrics=None):
        self.settings = settings
        self.controller = controller
        self.id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.node = _node_id()
        self.metrics = metrics if metrics is not None else ReplicaMetrics(self.id)
        self.outbox = Outbox(self.metrics, wake=self._poke)
        self.mgr = mgr if mgr is not None else make_manager(settings)
        self.metrics.watch(lambda: read_slots(self.mgr, self.desired.weights if self.desired else {}))
        self.mgr.on_oom = self.outbox.oom
        self.backend = SlotsBackend(self.mgr)
        self.eval_gate = EvalGate(self.backend, controller)
        self.routing = Routing()                     # what the request path routes by (see `_route`)
        self.handler = None                          # the request path, once the HTTP edge attaches it
        self.desired: DesiredState | None = None
        self._latest: DesiredState | None = None     # newest state seen (may be being applied)
        self._applying: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()             # one promote/rollback/release at a time
        self.applied = -1                            # fully applied (slots loaded as desired)
        self.routed = -1                             # live/previous/weights in effect
        self.error: dict | None = None
        self.loading: str | None = None
        self._failures = 0                           # failed applies in a row (retry backoff)
        self._retry_at: float | None = None          # loop time of the next retry, after a failure
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, handler) -> None:
        """Serve requests through `handler` (slotserve.api.handler.Handler, built by the
        HTTP edge around `backend` and `outbox`): from now on it routes by this replica's
        routing, and its in-flight count is reported."""
        handler.routing = self.routing
        self.handler = handler

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Fetch the desired state and load live + previous before taking traffic."""
        self._loop = asyncio.get_running_loop()
        await self.controller.call("report", self.id, self.status(), [])
        state = DesiredState.from_dict(await self.controller.call("watch", -1, 0.0))
        self._latest = state
        await self.apply(state)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_loop()), loop.create_task(self._report_loop())]

    async def stop(self) -> None:
        self._stopped = True
        for t in self._tasks + ([self._applying] if self._applying else []):
            t.cancel()
        self.eval_gate.cancel()
        try:
            await self.controller.call("forget", self.id)
        except Exception:
            pass

    async def _watch_loop(self) -> None:
        while not self._stopped:
            try:
                known = self._latest.version if self._latest else -1
                wait = HEARTBEAT_S
                if self._retry_at is not None:
                    wait = min(wait, max(0.0, self._retry_at - asyncio.get_running_loop().time()))
                d = DesiredState.from_dict(await self.controller.call("watch", known, wait))
                if d.version == known:
                    self._maybe_retry()
                    continue
                self._latest = d
                if self._applying is not None and not self._applying.done():
                    # A load is running (seconds for a big bundle): a rollback, promote or
                    # weight change must not wait for it.
                    await self._swap_now(d)
                    await self.report()
                else:
                    self._applying = asyncio.get_running_loop().create_task(self._apply_latest())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # controller restarting: retry, keep serving
                log.warning("watch failed: %s", exc)
                await asyncio.sleep(0.5)

    def _maybe_retry(self) -> None:
        """Apply the desired state again once the backoff after a failed apply ran out
        (nothing else would: the controller sends no new version for it)."""
        if self._retry_at is None or asyncio.get_running_loop().time() < self._retry_at:
            return
        if self._latest is None or (self._applying is not None and not self._applying.done()):
            self._retry_at = asyncio.get_running_loop().time() + RETRY_FIRST_S   # after that apply
            return
        self._retry_at = None
        log.info("retrying desired state v%s after %d failed attempt(s)", self._latest.version, self._failures)
        self._applying = asyncio.get_running_loop().create_task(self.apply(self._latest, retry=True))

    async def _report_loop(self) -> None:
        while not self._stopped:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.report_interval_s
                                       if self.outbox.events or self._rollout_active() else 1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.report()

    async def report(self) -> None:
        events = self.outbox.take()
        status = self.status()
        # the metrics snapshot rides along at most every PUSH_S: what a scrape on
        # another replica shows of this one (slotserve.metrics)
        snapshot = self.metrics.snapshot_due()
        try:
            await self.controller.call("report", self.id, status, events,
                                       **({"metrics": snapshot} if snapshot is not None else {}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("report failed: %s", exc)
            self.outbox.put_back(events)

    async def metrics_text(self) -> bytes:
        """The app's Prometheus text (slotserve.metrics.render): this replica's families
        read now, the other replicas' latest snapshots and the app's families through the
        controller; this replica's alone if the controller does not answer in time."""
        own = self.metrics.families()
        try:
            got = await asyncio.wait_for(self.controller.call("metrics"), METRICS_WAIT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("metrics of the other replicas not fetched: %s", exc)
            got = {}
        return render(own, self.id, got.get("replicas"), got.get("app", ()))

    def _rollout_active(self) -> bool:
        return bool(self.desired and self.desired.rollout_phase in ACTIVE)

    def _poke(self) -> None:
        """Wake the report loop; safe from the loader thread too."""
        loop = self._loop
        if loop is None:
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._wake.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(self._wake.set)

    def start_eval_gate(self) -> None:
        """Run the rollout's eval gate in the background through the attached request path
        (this replica received the rollout request: it holds both slots)."""
        self.eval_gate.start(self.handler.answer)

    # ------------------------------------------------------------ applying a desired state

    async def _apply_latest(self) -> None:
        while self._latest is not None and (self.desired is None
                                            or self._latest.version != self.desired.version):
            await self.apply(self._latest)

    async def _swap_now(self, d: DesiredState) -> None:
        """The swap part of `d` while a load is in progress: swaps and routing."""
        try:
            await self._swap(d)
        except Exception as exc:
            log.warning("swap for v%s deferred: %s", d.version, exc)
        self._route(d)
        if self._routes(d):
            self.routed = max(self.routed, d.version)

    async def _swap(self, d: DesiredState) -> None:
        """Promote or roll back if that is what makes live `d`'s live. Idempotent: the
        slots are read again under the swap lock, so a swap already done (by the watch
        loop while `apply` waited) is not done twice — a second rollback would roll
        forward."""
        async with self._swap_lock:
            cur = self.backend.digests()
            want_live = d.live.digest if d.live else None
            if not want_live or want_live == cur.get("live"):
                return
            if want_live == cur.get("candidate"):
                self.mgr.promote()                       # O(1), never waits for memory
                self.metrics.swap("promote")
            elif want_live == cur.get("previous"):
                # swap inline, copy-back in a thread
                await self.mgr.rollback_async(d.reason or "rollback")
                self.metrics.swap("rollback")

    def _routes(self, d: DesiredState) -> bool:
        """Live and previous are those of `d` (so requests are routed as `d` says)."""
        cur = self.backend.digests()
        return all(cur.get(s) == (d.slot(s).digest if d.slot(s) else None) for s in ("live", "previous"))

    async def apply(self, d: DesiredState, retry: bool = False) -> None:
        """Make the slots match `d`; route by its weights. Idempotent.

        Routing changes first (restricted to slots that hold a bundle), then slot
        operations, then routing again: a candidate is never released while new
        requests are still being routed to it. What failed to load leaves what serves
        in place; it is reported (`error`) and retried with capped backoff (`retry`)."""
        if self.error and self.error.get("version") == d.version and not retry:
            return
        self._route(d)
        superseded = False
        try:
            await self._reconcile(d)
            self.error = None
        except LoadAborted as exc:
            # A rollback (of a newer state) aborted this load to get the memory back: not
            # a failure of the bundle, so not reported as one (the controller would drop
            # the candidate as "load failed"). The newer state is applied next.
            superseded = self._latest is not None and self._latest.version > d.version
            log.warning("applying desired state v%s: %s%s", d.version, exc,
                        f"; applying v{self._latest.version} next" if superseded else "")
            if not superseded:
                self.error = {"version": d.version, "message": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            log.error("applying desired state v%s failed: %s", d.version, exc)
            self.error = {"version": d.version, "message": f"{type(exc).__name__}: {exc}"}
        finally:
            self.loading = None
        self.desired = d
        if self.error is None and not superseded:
            self.applied = d.version
            self.routed = max(self.routed, d.version)
            self._failures, self._retry_at = 0, None
        elif self.error is not None:
            self._failures += 1
            delay = retry_delay(self._failures)
            self._retry_at = asyncio.get_running_loop().time() + delay
            self.error["retry_in_s"] = delay
        newest = self._latest if self._latest is not None and self._latest.version > d.version else d
        self._route(newest)
        if d.safety is not None or self.outbox.safety is None:
            self.outbox.safety = SafetyFilter.from_config(d.safety)
        self.backend.prune()
        self._wake.set()
        await self.report()

    def _route(self, d: DesiredState) -> None:
        self.routing = Routing(
            weights={s: w for s, w in d.weights.items() if w > 0} or {"live": 100.0},
            salt=d.salt, sticky_key=None if d.sticky_key == "none" else d.sticky_key,
            served_name=self.settings.served_name or d.served_name, shadow_fraction=d.mirror_fraction)
        if self.handler is not None:
            self.handler.routing = self.routing

    async def _reconcile(self, d: DesiredState) -> None:
        mgr = self.mgr
        want = {s: (d.slot(s).digest if d.slot(s) else None) for s in SLOT_NAMES}
        cur = self.backend.digests()
        if want == {s: cur.get(s) for s in SLOT_NAMES}:
            return
        # O(1) swaps first: promote (candidate -> live, live -> previous) or rollback
        # (previous <-> live).
        await self._swap(d)
        cur = self.backend.digests()
        # A new live that is in no slot (e.g. `serve --bundle` changed it): stage it as the
        # candidate and promote, so live never goes empty while it loads.
        if want["live"] and cur.get("live") and cur["live"] != want["live"]:
            if cur.get("candidate"):
                mgr.release("candidate")
            await self._load(d.live, "candidate", d)
            async with self._swap_lock:
                mgr.promote()
                self.metrics.swap("promote")
        # Release what is no longer wanted (candidate first: it is what a revert drops).
        # Under the swap lock, reading the slots again: the watch loop may have swapped
        # them while we loaded, and a slot a rollback is bringing back must stay.
        async with self._swap_lock:
            cur = self.backend.digests()
            for s in ("candidate", "previous", "live"):
                if cur.get(s) and cur.get(s) != want[s]:
                    mgr.release(s)
            cur = self.backend.digests()
        # Load what is missing: live first, so a new replica can serve as early as possible.
        for s in ("live", "previous", "candidate"):
            ref = d.slot(s)
            if ref is not None and cur.get(s) != ref.digest:
                await self._load(ref, s, d)

    async def _load(self, ref, slot: str, d: DesiredState) -> None:
        self.loading = f"{slot}: {ref.ref}"
        await self.report()
        kw = {"evict_previous": True} if slot == "candidate" and d.evict_previous else {}
        await asyncio.to_thread(self.mgr.load, ref.ref, slot, **kw)
        got = self.backend.digests().get(slot)
        if got != ref.digest:
            raise RuntimeError(f"slot {slot} holds {got} after loading {ref.ref} ({ref.digest})")

    # ------------------------------------------------------------ health and status

    def ready(self) -> tuple[bool, str]:
        d = self.desired
        if d is None:
            return False, "waiting for the controller"
        cur = self.backend.digests()
        for s in ("live", "previous"):
            ref = d.slot(s)
            if ref is not None and cur.get(s) != ref.digest:
                why = f"loading {s} {ref.ref}" if self.loading else f"{s} {ref.ref} not loaded"
                if self.error:
                    why += f" (last error: {self.error['message']})"
                return False, why
        if "live" not in cur:
            return False, "no live bundle"
        return True, "ok"

    def health(self) -> dict:
        """Readiness for a load balancer (GET /healthz): `ready` is "can answer a request
        now", true while a live bundle serves, even while a candidate loads, a load was
        interrupted, or previous failed to load and is being retried (all said in the
        body). `converged` is the stricter `ready()`: live and previous of the current
        desired state loaded, which is what the controller waits for.
        `desired_version` is the newest desired state this replica has heard of."""
        cur = {s: v.ref for s, v in self.backend.views().items()}
        converged, why = self.ready()
        latest = self._latest or self.desired
        live = cur.get("live")
        ok = live is not None and latest is not None
        if ok:
            status = "ok" if converged else f"serving {live}; {why}"
        else:
            status = "waiting for the controller" if latest is None else f"no live bundle loaded: {why}"
        return {"ready": ok, "status": status, "converged": converged, "replica": self.id,
                "desired_version": latest.version if latest is not None else None,
                "applied_version": self.applied, "slots": cur, "loading": self.loading,
                "error": self.error}

    def slot_state(self) -> dict:
        try:
            st = self.mgr.state()
        except Exception as exc:
            return {"error": str(exc)}
        return jsonable(st)

    def status(self) -> dict:
        ok, why = self.ready()
        return {"node": self.node, "applied": self.applied, "routed": self.routed, "ready": ok, "why": why,
                "slots": self.slot_state(), "error": self.error,
                "inflight": self.handler.inflight if self.handler is not None else 0,
                "loading": self.loading}


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:
        pass
    return socket.gethostname()
