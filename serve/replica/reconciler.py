"""Applying a desired state to a replica's slots: the converging half of `Replica`.

`Reconciler` is mixed into `Replica` (serve/replica.py). `apply(d)` makes the slots
match `d` and routes requests by its weights: O(1) swaps first (promote, rollback),
then releases, then loads (in a thread: live keeps serving). While a load runs, the
watch loop calls `_swap_now` so a rollback, promote or weight change never waits for
it.

Nothing here may block the event loop, which serves every request of the replica:
* swaps are serialized by `_swap_lock` and read the slots again under it, so a swap is
  never done twice (a second rollback would roll forward);
* a rollback to a parked previous waits for the slot manager's memory lock, so it runs
  in a thread (`SlotManager.rollback_async`); it aborts an in-flight candidate load,
  which is not an error: the newer desired state is applied next (loading the
  candidate again if it still names one).

Uses the replica's `mgr`, `backend`, `handler`, `settings`, `_latest`, `report` and
the version/error fields it reports.
"""

from __future__ import annotations

import asyncio
import logging

from slotserve.api.handler import Routing
from slotserve.control.state import SLOTS, DesiredState
from slotserve.slots.load_abort import LoadAborted

log = logging.getLogger("slotserve.replica")


class Reconciler:
    """The converging half of `Replica`: apply, swaps, releases, loads."""

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
            elif want_live == cur.get("previous"):
                reason = d.reason or "rollback"
                if hasattr(self.mgr, "rollback_async"):  # swap inline, copy-back in a thread
                    await self.mgr.rollback_async(reason)
                else:                                    # a custom manager: keep it off the loop
                    await asyncio.to_thread(self.mgr.rollback, reason)

    def _routes(self, d: DesiredState) -> bool:
        """Live and previous are those of `d` (so requests are routed as `d` says)."""
        cur = self.backend.digests()
        return all(cur.get(s) == (d.slot(s).digest if d.slot(s) else None) for s in ("live", "previous"))

    async def apply(self, d: DesiredState) -> None:
        """Make the slots match `d`; route by its weights. Idempotent.

        Routing changes first (restricted to slots that hold a bundle), then slot
        operations, then routing again: a candidate is never released while new
        requests are still being routed to it."""
        if self.error and self.error.get("version") == d.version:
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
        newest = self._latest if self._latest is not None and self._latest.version > d.version else d
        self._route(newest)
        if d.safety is not None or self.safety is None:
            from slotserve.rollout.safety import SafetyFilter
            self.safety = SafetyFilter.from_config(d.safety)
        self.backend.prune()
        self._wake.set()
        await self.report()   # (refreshes the slot gauges too)

    def _route(self, d: DesiredState) -> None:
        self.handler.routing = Routing(
            weights={s: w for s, w in d.weights.items() if w > 0} or {"live": 100.0},
            salt=d.salt, sticky_key=None if d.sticky_key == "none" else d.sticky_key,
            served_name=self.settings.served_name or d.served_name, shadow_fraction=d.mirror_fraction)

    async def _reconcile(self, d: DesiredState) -> None:
        mgr = self.mgr
        want = {s: (d.slot(s).digest if d.slot(s) else None) for s in SLOTS}
        cur = self.backend.digests()
        if want == {s: cur.get(s) for s in SLOTS}:
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
