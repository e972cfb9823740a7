"""Loading a bundle into a slot: the load half of `SlotManager` (serve/slots.py).

`SlotLoading` is mixed into `SlotManager`. A load opens and verifies the bundle (no
lock: hashing touches no device memory), then, under the memory lock, plans the memory
(parking previous in host memory when the bundle does not fit beside it and
`park_when_full`), builds the engine and tokenizer, and places the slot under the
routing lock. It runs in a throttled low-priority loader thread (slotserve.slots.loader)
so live keeps its latency, and it carries a `LoadTicket`: a rollback that needs the
memory aborts a candidate load rather than wait for it (slotserve.slots.load_abort).

Uses the manager's `_lock`, `_mem_lock`, `_slots`, `pool`, `park`, the accounting of
`SlotMemory` and the OOM events of `SlotRequests`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import torch

from slotserve.slots.faults import FaultInjector, Faults
from slotserve.slots.loader import load_engine, load_tokenizer, run_in_loader_thread, same_tokenizer, shared_fn
from slotserve.slots.load_abort import LoadTicket, checked_by
from slotserve.slots.planner import MemoryPlanError, estimate, kv_tokens, plan
from slotserve.slots.slot import Slot
from slotserve.slots.state import SlotError

log = logging.getLogger("slotserve.slots")


class SlotLoading:
    """The load half of `SlotManager`: load / load_async, abortable by a rollback."""

    def load(self, ref: str, slot: str = "candidate", evict_previous: bool = False) -> Slot:
        """Open, verify, plan memory, build the engine and tokenizer, then place the slot.

        Live keeps serving meanwhile: the heavy work runs in a lower-priority loader
        thread and the routing lock is taken only to place the result. Refuses with
        MemoryPlanError (numbers in the message) rather than squeezing live/previous;
        `evict_previous=True` releases previous first. Blocks the caller until done.
        A rollback that needs the memory aborts a candidate load: LoadAborted.
        """
        self._check_name(slot)
        ticket = LoadTicket(ref, slot)
        # All of it — opening, hashing, planning, building — runs in the throttled
        # loader thread: any Python work here competes with live for the GIL. Once
        # aborted it stops throttling: unwinding fast is what the rollback waits for.
        return run_in_loader_thread(lambda: self._load(ref, slot, evict_previous, ticket), self.loader_nice,
                                    self.loader_slice_s, self.loader_pause_s,
                                    lambda: not ticket.aborted and self._serving())

    def _load(self, ref: str, slot: str, evict_previous: bool, ticket: LoadTicket) -> Slot:
        self._check_empty(slot)  # cheap refusal before hashing the bundle
        t0 = time.perf_counter()
        # Opening verifies every file's hash (seconds for a big bundle) and touches no
        # device memory: done before taking _mem_lock, so a rollback never waits for it.
        bundle = self.store.open(ref)
        faults = Faults.from_serving(bundle.serving)   # refuse bad drills before any memory
        with self._mem_lock:
            self._load_ticket = ticket
            try:
                return self._load_locked(bundle, faults, slot, evict_previous, ticket, t0)
            finally:
                self._load_ticket = None

    def _load_locked(self, bundle, faults: Faults, slot: str, evict_previous: bool, ticket: LoadTicket,
                     t0: float) -> Slot:
        self._check_empty(slot)
        ticket.check()
        if evict_previous and slot != "previous":
            self.release("previous")
        need = estimate(bundle, device=str(self.device), shared=shared_fn(bundle, self._all_slots()),
                        headroom_bytes=self.headroom_bytes)
        try:
            plan(need, self.device_memory(), self._held())
        except MemoryPlanError:
            prev = self.get("previous")
            if not (self.park_when_full and slot != "previous" and prev and prev.tier == "device"):
                raise
            log.warning("%s does not fit beside previous %s: parking previous in host memory",
                        bundle.ref, prev.ref)
            self.park("previous")
            # previous's pool claims are gone: what was shared with it is not any more
            need = estimate(bundle, device=str(self.device), shared=shared_fn(bundle, self._all_slots()),
                            headroom_bytes=self.headroom_bytes)
            plan(need, self.device_memory(), self._held())
        ticket.check()
        injector = FaultInjector(faults, bundle.digest)
        cfg, serving = _json(bundle.path / "model" / "config.json"), bundle.serving
        try:
            injector.on_load()  # faults.oom_after == 0 drills an OOM right here
            with checked_by(ticket):   # a checkpoint before each weight tensor is read
                engine = load_engine(bundle.path, self.device, self.pool,
                                     kv_tokens(cfg, serving, str(self.device)))
            try:
                ticket.check()
                tokenizer = same_tokenizer(bundle, self._all_slots()) or load_tokenizer(bundle)
                ticket.check()
            except BaseException:
                engine.close()
                raise
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            ev = self._oom_event(slot, bundle.ref, bundle.digest, "load", exc)
            self._fire(ev)
            raise MemoryPlanError(
                f"loading {bundle.ref} into {slot} ran out of memory on {self.device} although "
                f"the plan fit ({need.total_bytes} B needed, {ev.free_bytes} B free now; held: "
                f"{ev.held}): {exc}", needed=need.total_bytes, free=ev.free_bytes,
                held=ev.held) from exc
        injector.install(engine)
        s = Slot(slot, bundle, engine, tokenizer, faults=faults, injector=injector,
                 seq=next(self._seq), load_s=time.perf_counter() - t0)
        with self._lock:
            # Swaps do not take _mem_lock: a promote/rollback may have filled the slot
            # while we loaded. Never overwrite (that would leak an unplanned engine).
            clash = self._slots.get(slot)
            if clash is None:
                self._slots[slot] = s
        if clash is not None:
            engine.close()
            raise SlotError(f"slot {slot} was filled by {clash.ref} while {bundle.ref} loaded; "
                            "release it first, then load")
        log.info("loaded %s into %s in %.2fs (%s path)", s.ref, slot, s.load_s, engine.path)
        return s

    def _check_empty(self, slot: str) -> None:
        if (s := self.get(slot)) is not None:
            raise SlotError(f"slot {slot} already holds {s.ref}; release it first "
                            f"(or promote/rollback), then load")

    async def load_async(self, ref: str, slot: str = "candidate", evict_previous: bool = False) -> Slot:
        return await asyncio.to_thread(self.load, ref, slot, evict_previous)

    def _serving(self) -> bool:
        """Whether any slot has requests running (the loader throttles itself then)."""
        try:
            return any(s._inflight for s in list(self._slots.values()))
        except RuntimeError:  # the table changed under us: assume busy
            return True


def _json(path):
    return json.loads(path.read_text())
