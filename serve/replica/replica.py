"""One serving replica without Ray: converge the slots to the desired state, report back.

A `Replica` owns a SlotManager, the request `Handler` and two background loops:

* watch: long-polls the controller for the desired state and applies it — promote and
  rollback are O(1) swaps; only a bundle not yet in any slot is loaded (in a thread,
  so live keeps serving while a candidate loads);
* report: sends the applied version, the slots, and the request outcomes (for the
  controller's rollout windows) every `report_interval_s`.

Nothing here may block the event loop: it serves every request of the replica (how
swaps keep to that while a load holds the slot manager's memory lock: serve/reconciler.py).

The Ray deployment (slotserve.app) is a thin shell around this; tests drive it with
an in-process controller.

Layout: this file is the life cycle (start/stop, the two loops) and health/status;
applying a desired state is in serve/reconciler.py, the event outbox in serve/outbox.py
and the eval gate in serve/eval_gate.py (mixed in); settings in serve/replica_settings.py,
the controller links in serve/controller_link.py and the handler's view of the slots in
serve/slots_backend.py. The names other modules import from here are re-exported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from slotserve.api.auth import TokenCheck
from slotserve.api.handler import Handler
from slotserve.api.response_ids import ResponseIds
from slotserve.control.state import HEARTBEAT_S, DesiredState
from slotserve.replica.backend import SlotsBackend
from slotserve.replica.eval_gate import EvalGate
from slotserve.replica.outbox import MAX_OUTBOX, Outbox, _jsonable
from slotserve.replica.reconciler import Reconciler
from slotserve.replica.settings import Settings, make_manager


log = logging.getLogger("slotserve.replica")


class Replica(Reconciler, Outbox, EvalGate):
    """One replica: a slot manager, the request handler, the watch and report loops."""

    def __init__(self, settings: Settings, controller, *, mgr=None, replica_id: str | None = None,
                 metrics=None):
        self.settings = settings
        self.controller = controller
        self.id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.node = _node_id()
        if mgr is None:
            mgr = make_manager(settings, on_oom=self._on_oom)
        elif hasattr(mgr, "on_oom"):
            mgr.on_oom = self._on_oom
        self.mgr = mgr
        self.backend = SlotsBackend(mgr)
        self.metrics = metrics
        # every replica of the app derives the same id-signing key from the admin token
        ids = ResponseIds(TokenCheck(settings.admin_token_sha256, settings.store).expected_sha)
        self.handler = Handler(self.backend, observe=self._observe, on_shadow=self.shadow, ids=ids)
        self.desired: DesiredState | None = None
        self._latest: DesiredState | None = None     # newest state seen (may be being applied)
        self._applying: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()             # one promote/rollback/release at a time
        self.applied = -1                            # fully applied (slots loaded as desired)
        self.routed = -1                             # live/previous/weights in effect
        self.error: dict | None = None
        self.loading: str | None = None
        self.outbox: list[dict] = []
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.safety = None

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
        try:
            await self.controller.call("forget", self.id)
        except Exception:
            pass

    async def _watch_loop(self) -> None:
        while not self._stopped:
            try:
                known = self._latest.version if self._latest else -1
                d = DesiredState.from_dict(await self.controller.call("watch", known, HEARTBEAT_S))
                if d.version == known:
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

    async def _report_loop(self) -> None:
        while not self._stopped:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.report_interval_s
                                       if self.outbox or self._rollout_active() else 1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.report()

    async def report(self) -> None:
        events, self.outbox = self.outbox, []
        status = self.status()
        # every report refreshes the slot gauges from the state it sends: so they exist
        # before the first state change and follow tier moves
        self.refresh_gauges(status["slots"])
        try:
            await self.controller.call("report", self.id, status, events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("report failed: %s", exc)
            self.outbox = (events + self.outbox)[-MAX_OUTBOX:]

    def refresh_gauges(self, slot_state: dict) -> None:
        if self.metrics is not None and self.desired is not None:
            try:
                self.metrics.slots(slot_state, self.backend.views(), self.desired.weights)
            except Exception as exc:   # metrics must never break serving
                log.debug("slot gauges not updated: %s", exc)

    def _rollout_active(self) -> bool:
        return bool(self.desired and self.desired.rollout_phase in ("pending_eval", "running"))

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

    def slot_state(self) -> dict:
        try:
            st = self.mgr.state()
        except Exception as exc:
            return {"error": str(exc)}
        return _jsonable(st)

    def status(self) -> dict:
        ok, why = self.ready()
        return {"node": self.node, "applied": self.applied, "routed": self.routed, "ready": ok, "why": why,
                "slots": self.slot_state(), "error": self.error,
                "inflight": self.handler.inflight, "loading": self.loading}


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:
        pass
    return socket.gethostname()
