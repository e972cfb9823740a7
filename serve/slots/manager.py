"""`SlotManager`: the live / previous / candidate slots of one replica on one device.

    mgr = SlotManager(store, device="cpu", memory_budget_bytes=parse_size("1GiB"))
    mgr.load("support-bot:2")              # candidate, while live keeps serving
    mgr.promote()                          # live -> previous, candidate -> live
    mgr.rollback("p99 breach")             # previous <-> live: a pointer swap
    req = await mgr.generate("live", ids, SamplingParams(max_tokens=16))
    async for tok in req: ...

Two locks, so that rollback stays O(1) whatever else is happening:
* `_lock` (routing) guards only the name -> Slot table; it is held for a dict update,
  never for I/O. `generate`, `promote`, `rollback`, `release` take it briefly.
* `_mem_lock` serializes whatever changes device memory — loads, parks, unparks — so
  the planner always sees a consistent picture. A load holds it for its whole duration
  (seconds for big bundles) but never holds `_lock` meanwhile.

Rollback is the emergency path. With previous warm on the device it is a pointer swap
under `_lock` alone. With previous parked in host memory it must copy it back, which
needs `_mem_lock`: it then aborts an in-flight candidate load (slotserve.slots.load_abort)
instead of waiting for it — the candidate is the one slot that may be sacrificed, live
and previous never are. Callers on an event loop use `rollback_async`, which does the
swap inline and only the copy-back in a thread, so the loop never waits on the lock.

Rollback swaps previous and live, so the old live becomes previous: rolling back twice
is a roll-forward. Promote drops the old previous (released once its requests finish).
Nothing here writes the ledger: the replica reports (load results, `on_oom` events) to
the controller, which owns the ledger, so N replicas do not write N entries.

Layout: this file is the façade (the slot table, its locks, swaps, release, state);
loading is in serve/slot_loading.py, park/unpark and the byte accounting in
serve/slot_memory.py, requests and the OOM guard in serve/slot_requests.py (mixed in).
The names tests and other modules import from here are re-exported.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Callable

import torch

from slotserve.slots.loader import run_in_loader_thread
from slotserve.slots.loading import SlotLoading
from slotserve.slots.load_abort import AbortablePool, LoadTicket
from slotserve.slots.planner import MemoryPlanError, available_bytes
from slotserve.slots.requests import SlotRequests
from slotserve.slots.slot import Slot
from slotserve.slots.slot_memory import SlotMemory
from slotserve.slots.state import OOMEvent, SlotError, SlotInfo, SlotsState, Swap

log = logging.getLogger("slotserve.slots")

SLOT_NAMES = ("live", "previous", "candidate")


class SlotManager(SlotLoading, SlotMemory, SlotRequests):
    """The live / previous / candidate slots of one replica on one device (see the module doc)."""

    def __init__(self, store, device: str = "cpu", memory_budget_bytes: int | None = None, *,
                 headroom_bytes: int | None = None, on_oom: Callable[[OOMEvent], None] | None = None,
                 retry_after_s: float = 1.0, park_when_full: bool | None = None, loader_nice: int = 10,
                 loader_slice_s: float = 0.0005, loader_pause_s: float = 0.005):
        self.store = store
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.budget_bytes = memory_budget_bytes
        self.headroom_bytes = headroom_bytes
        self.on_oom = on_oom                  # called with an OOMEvent; must not block long
        self.retry_after_s = retry_after_s    # what a 429 tells clients when live is out of memory
        # Parking previous frees device memory only where host memory is separate.
        self.park_when_full = (dev.type == "cuda") if park_when_full is None else park_when_full
        self.loader_nice = loader_nice        # loads run at lower CPU priority than serving
        self.loader_slice_s, self.loader_pause_s = loader_slice_s, loader_pause_s  # GIL duty cycle
        self.pool = AbortablePool()           # identical tensors shared between slots
        self._slots: dict[str, Slot] = {}
        self._draining: list[Slot] = []       # released, still finishing requests
        self._lock = threading.Lock()
        self._mem_lock = threading.RLock()
        self._seq = itertools.count()
        self._load_ticket: LoadTicket | None = None   # the load holding _mem_lock, if any
        self.events: list[OOMEvent] = []      # recent OOM events (state / debugging)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> Slot | None:
        self._check_name(name)
        with self._lock:
            return self._slots.get(name)

    def slot(self, name: str) -> Slot:
        s = self.get(name)
        if s is None:
            raise SlotError(f"slot {name!r} is empty; occupied slots: {self._occupied() or 'none'}")
        return s

    def _occupied(self) -> str:
        with self._lock:
            return ", ".join(f"{n}={s.ref}" for n, s in self._slots.items())

    @staticmethod
    def _check_name(name: str) -> None:
        if name not in SLOT_NAMES:
            raise SlotError(f"unknown slot {name!r}; valid slots: {', '.join(SLOT_NAMES)}")

    # ------------------------------------------------------------------ swaps
    def promote(self) -> Swap:
        """candidate -> live, live -> previous (the old previous is released). O(1)."""
        t0 = time.perf_counter()
        with self._lock:
            cand = self._slots.get("candidate")
            if cand is None:
                raise SlotError("no candidate to promote; load one first (slots: "
                                + (", ".join(self._slots) or "none") + ")")
            dropped = self._slots.pop("previous", None)
            live = self._slots.pop("live", None)
            self._slots["live"] = cand
            cand.name = "live"
            del self._slots["candidate"]
            if live is not None:
                self._slots["previous"] = live
                live.name = "previous"
            if dropped is not None:
                self._retire_locked(dropped)
        took = time.perf_counter() - t0
        self._close_if_idle(dropped, wait=False)
        return Swap("promote", cand.ref, live.ref if live else None,
                    dropped.ref if dropped else None, took)

    def rollback(self, reason: str = "") -> Swap:
        """previous -> live and live -> previous: a pointer swap, no reload.

        The old live stays warm as previous, so a second rollback rolls forward. If
        previous is parked in host memory it is copied back first (outside the routing
        lock: live serves meanwhile); that copy is planned like a load, and an in-flight
        candidate load is aborted rather than waited for. May block on the memory lock:
        from an event loop use `rollback_async`.
        """
        t0 = time.perf_counter()
        swap = self._swap_back(reason, t0)
        if swap is not None:
            return swap
        why = f"rollback ({reason or 'no reason given'}) needs the memory to bring previous back"
        # Abort whichever candidate load holds the lock, until we hold it: another load
        # may take it between our abort and our acquire.
        self._abort_candidate_load(why)
        while not self._mem_lock.acquire(timeout=0.05):
            self._abort_candidate_load(why)
        try:
            if self.get("previous") is None:
                raise SlotError("nothing to roll back to: the previous slot is empty")
            try:
                self.unpark("previous")
            except MemoryPlanError:
                # Previous was parked to make room for a candidate. Live and previous are
                # never sacrificed; the candidate is: release it and bring previous back.
                if self.get("candidate") is None:
                    raise
                log.warning("rollback: releasing candidate %s to bring previous back on %s",
                            self.get("candidate").ref, self.device)
                self.release("candidate")
                self.unpark("previous")
            # Still under _mem_lock: no load can park previous again before the swap.
            swap = self._swap_back(reason, t0)
        finally:
            self._mem_lock.release()
        if swap is None:
            raise SlotError("previous changed while rolling back; retry")
        return swap

    async def rollback_async(self, reason: str = "") -> Swap:
        """`rollback` for callers on an event loop: never blocks it. The pointer swap
        (previous warm on the device) runs inline; bringing a parked previous back
        (waiting for the memory lock, copying weights) runs in a thread."""
        swap = self._swap_back(reason, time.perf_counter())
        if swap is not None:
            return swap
        return await asyncio.to_thread(self.rollback, reason)

    def _swap_back(self, reason: str, t0: float) -> Swap | None:
        """The O(1) swap under the routing lock; None when previous is not on the device."""
        with self._lock:
            prev = self._slots.get("previous")
            if prev is None:
                raise SlotError("nothing to roll back to: the previous slot is empty")
            if prev.tier != "device":
                return None
            live = self._slots.get("live")
            self._slots["live"] = prev
            prev.name = "live"
            if live is not None:
                self._slots["previous"] = live
                live.name = "previous"
            else:
                del self._slots["previous"]
        took = time.perf_counter() - t0
        log.info("rollback to %s in %.3f ms (%s)", prev.ref, took * 1e3, reason or "no reason given")
        return Swap("rollback", prev.ref, live.ref if live else None, None, took, reason)

    def _abort_candidate_load(self, why: str) -> None:
        ticket = self._load_ticket
        if ticket is not None and ticket.slot == "candidate" and ticket.abort(why):
            log.warning("aborting the load of candidate %s: %s", ticket.ref, why)

    def release(self, slot: str) -> str | None:
        """Empty `slot`; its engine closes once its in-flight requests finish. Returns
        the released ref, or None if the slot was empty (idempotent)."""
        self._check_name(slot)
        with self._lock:
            s = self._slots.pop(slot, None)
            if s is not None:
                self._retire_locked(s)
        self._close_if_idle(s, wait=True)
        return s.ref if s else None

    def _retire_locked(self, s: Slot) -> None:
        with s._cv:
            s.released = True
            if s._inflight:
                self._draining.append(s)

    def _close_if_idle(self, s: Slot | None, wait: bool) -> None:
        """Close a retired slot's engine unless requests still run on it (then its last
        request does). wait=True: before returning, so the memory is free (release);
        wait=False: in the background, so a swap or the event loop never waits on it."""
        if s is None:
            return
        with s._cv:
            idle = s._inflight == 0
        if idle and wait:
            run_in_loader_thread(s.close, self.loader_nice, self.loader_slice_s,
                                 self.loader_pause_s, self._serving)
        elif idle:
            threading.Thread(target=s.close, name="slotserve-slot-close", daemon=True).start()
        with self._lock:
            self._draining = [d for d in self._draining if not d.engine.closed]

    # ------------------------------------------------------------------ state
    def state(self) -> SlotsState:
        named, draining, acc, held = self._accounting()
        infos = {}
        for n in SLOT_NAMES:
            if (s := named.get(n)) is not None:
                a = acc[id(s)]
                infos[n] = SlotInfo(
                    name=n, ref=s.ref, digest=s.digest, tier=s.tier, held_bytes=a.held_bytes,
                    shared_bytes=a.shared_bytes, weight_bytes=a.weight_bytes, kv_bytes=a.kv_bytes,
                    faults=s.faults.as_dict(), path=s.engine.path, inflight=s.inflight,
                    load_s=round(s.load_s, 4), loaded_at=s.loaded_at)
        try:
            free = available_bytes(self.device_memory(), held)
        except ValueError:  # nothing reports free memory and no budget is set
            free = None
        return SlotsState(device=str(self.device), budget_bytes=self.budget_bytes, free_bytes=free,
                          slots=infos, draining=tuple(d.ref for d in draining),
                          oom_events=len(self.events))

    def close(self) -> None:
        """Release every slot now (tests, shutdown): in-flight requests are failed."""
        for n in SLOT_NAMES:
            self.release(n)
        for d in self._all_slots():
            d.close()
