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
needs `_mem_lock`: it then aborts an in-flight candidate load (its `LoadTicket`)
instead of waiting for it — the candidate is the one slot that may be sacrificed, live
and previous never are. Callers on an event loop use `rollback_async`, which does the
swap inline and only the copy-back in a thread, so the loop never waits on the lock.

Rollback swaps previous and live, so the old live becomes previous: rolling back twice
is a roll-forward. Promote drops the old previous (released once its requests finish).
Nothing here writes the ledger: the replica reports (load results, `on_oom` events) to
the controller, which owns the ledger, so N replicas do not write N entries.

Loads open and verify the bundle (no lock: hashing touches no device memory), then,
under the memory lock, plan the memory (parking previous in host memory when the bundle
does not fit beside it and `park_when_full`), build the slot and place it under the
routing lock. The building runs in the manager's `SlotLoader` (slotserve.slots.loader):
a throttled low-priority thread, so live keeps its latency.

Requests enter a slot under the routing lock (so a release cannot slip in between). Out
of memory on a candidate — at submit, or mid-stream through `SlotRequest` — releases the
candidate, fires `on_oom` once with the memory figures and retries the request on live;
out of memory on live or previous sheds load instead (`Overloaded`, a 429 with
Retry-After): those are never released for it.

Byte accounting: a storage shared by several slots (tensor-pool dedup) is counted once,
on the oldest slot (slotserve.slots.state.account); the planner's `held` and `state()`'s
figures both come from it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Callable

import torch

from slotserve import SLOT_NAMES
from slotserve.engine import SamplingParams
from slotserve.slots.faults import Faults, InjectedOOM
from slotserve.slots.loader import AbortablePool, LoadTicket, SlotLoader, shared_fn
from slotserve.slots.planner import (LoadEstimate, MemoryPlanError, available_bytes, device_memory, estimate,
                                     kv_tokens, plan)
from slotserve.slots.share import can_share
from slotserve.slots.slot import Slot, SlotRequest
from slotserve.slots.state import OOMEvent, Overloaded, SlotError, SlotInfo, SlotsState, Swap, account

log = logging.getLogger("slotserve.slots")


class SlotManager:
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
        self.pool = AbortablePool()           # identical tensors shared between slots
        self.loader = SlotLoader(dev, self.pool, nice=loader_nice, slice_s=loader_slice_s,
                                 pause_s=loader_pause_s)
        self._slots: dict[str, Slot] = {}
        self._draining: list[Slot] = []       # released, still finishing requests
        self._lock = threading.Lock()
        self._mem_lock = threading.RLock()
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
            self.loader.run(s.close, self._serving)
        elif idle:
            threading.Thread(target=s.close, name="slotserve-slot-close", daemon=True).start()
        with self._lock:
            self._draining = [d for d in self._draining if not d.closed]

    # ------------------------------------------------------------------ loading
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
        return self.loader.run(lambda: self._load(ref, slot, evict_previous, ticket),
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
        host = self._share_host(bundle)
        need = self._plan(bundle, slot, host)
        ticket.check()
        kv = kv_tokens(_json(bundle.path / "model" / "config.json"), bundle.serving, str(self.device))
        try:
            if host is not None:   # an adapter version of a resident base: join its engine
                s = self.loader.join(bundle, slot, host, ticket, self._all_slots, t0)
            else:
                s = self.loader.build(bundle, slot, faults, kv, ticket, self._all_slots, t0)
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
        with self._lock:
            # Swaps do not take _mem_lock: a promote/rollback may have filled the slot
            # while we loaded. Never overwrite (that would leak an unplanned engine).
            clash = self._slots.get(slot)
            if clash is None:
                self._slots[slot] = s
        if clash is not None:
            s.close()
            raise SlotError(f"slot {slot} was filled by {clash.ref} while {bundle.ref} loaded; "
                            "release it first, then load")
        log.info("loaded %s into %s in %.2fs (%s path)", s.ref, slot, s.load_s, s.engine.path)
        return s

    def _share_host(self, bundle) -> Slot | None:
        """A named slot whose engine `bundle` can join (slotserve.slots.share), oldest first."""
        with self._lock:
            named = sorted(self._slots.values(), key=lambda s: s.seq)
        return next((s for s in named if can_share(bundle, s)), None)

    def _plan(self, bundle, slot: str, host: Slot | None = None) -> LoadEstimate:
        """What loading `bundle` needs, refused (MemoryPlanError) unless it fits beside what
        the slots hold; parks previous in host memory first when that makes it fit (and
        `park_when_full`). Joining `host`'s engine needs the adapter's bytes alone: the base
        weights are resident and the KV pool is the engine's."""
        need = estimate(bundle, device=str(self.device), shared=shared_fn(bundle, self._all_slots()),
                        headroom_bytes=self.headroom_bytes)
        if host is not None:
            need = LoadEstimate(need.weight_bytes, 0, 0, need.shared_bytes)
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
        return need

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

    # ------------------------------------------------------------------ tiers and memory
    def park(self, slot: str = "previous", timeout: float | None = 30.0) -> int:
        """Move `slot`'s exclusive tensors to (pinned) host memory; returns bytes moved.
        Waits for its in-flight requests; new ones are refused while it is parked."""
        if slot == "live":
            raise SlotError("live cannot be parked (it serves); park previous or candidate")
        with self._mem_lock:
            s = self.slot(slot)
            if s.tier == "host" or s.shares_engine:   # a shared engine serves another slot: it stays
                return 0
            with s._cv:
                s.tier = "moving"
            if not s.wait_idle(timeout):
                s.tier = "device"
                raise SlotError(f"cannot park {slot}: {s.inflight} requests still running after {timeout}s")
            try:
                s.engine.park()                   # pinned on CUDA; what another engine shares stays on the device
                s.parked = s.engine.parked
            except BaseException:
                s.tier = "device"                 # the engine changed nothing
                raise
            s.tier = "host"
            return s.parked.moved_bytes

    def unpark(self, slot: str = "previous") -> int:
        """Copy a parked slot back to the device (planned like a load)."""
        with self._mem_lock:
            s = self.slot(slot)
            if s.tier != "host":
                return 0
            need = LoadEstimate(s.parked.moved_bytes, s.parked.kv_bytes, 0)
            plan(need, self.device_memory(), self._held())
            s.tier = "moving"
            try:
                n = s.engine.unpark()
            except BaseException:
                s.tier = "host"
                raise
            s.parked, s.tier = None, "device"
            return n

    def device_memory(self):
        return device_memory(str(self.device), self.budget_bytes)

    def _all_slots(self) -> list[Slot]:
        with self._lock:
            return list(self._slots.values()) + [d for d in self._draining if not d.closed]

    def _accounting(self):
        """(slots by name, draining slots, their Acc by id, device bytes held per entry)."""
        with self._lock:
            named = dict(self._slots)
            draining = [d for d in self._draining if not d.closed]
        acc = account(list(named.values()) + draining, self.device)
        held = {n: acc[id(s)].device_bytes for n, s in named.items()}
        held.update({f"released {d.ref}": acc[id(d)].device_bytes for d in draining})
        return named, draining, acc, held

    def _held(self) -> dict[str, int]:
        """Device bytes each slot holds (shared tensors counted once, on the oldest slot)."""
        return self._accounting()[3]

    # ------------------------------------------------------------------ requests and the OOM guard
    async def generate(self, slot: str | Slot, prompt_ids: list[int], params=None) -> SlotRequest:
        """Start a request on `slot` (a name, or a Slot object to pin it) -> SlotRequest.

        Applies the slot's faults, then submits to its engine. OOM guard: out of memory
        on a candidate releases it, fires `on_oom` and retries on live (returning live's
        request); out of memory on live/previous raises Overloaded (a 429).
        """
        params = _params(params)
        s = self._acquire(slot)
        try:
            if s.injector is not None:
                await s.injector.before_request_async()
            handle = s.submit(prompt_ids, params)
        except torch.OutOfMemoryError as exc:
            s._exit()
            req = await self._after_oom(s, exc, prompt_ids, params)
            req.first_slot, req.retried = s, True
            return req
        except BaseException:
            s._exit()
            raise
        return SlotRequest(s, handle, list(prompt_ids), params, self._after_oom)

    def _acquire(self, slot: str | Slot) -> Slot:
        with self._lock:
            if isinstance(slot, Slot):
                s = slot
            else:
                self._check_name(slot)
                s = self._slots.get(slot)
                if s is None:
                    raise SlotError(f"slot {slot!r} is empty; occupied: "
                                    + (", ".join(f"{n}={o.ref}" for n, o in self._slots.items()) or "none"))
            s._enter()  # under the routing lock: a release cannot slip in between
            return s

    async def _after_oom(self, s: Slot, exc: BaseException, prompt_ids, params) -> SlotRequest:
        if s.name != "candidate":
            raise Overloaded(self.retry_after_s,
                             f"out of memory on {s.name} ({s.ref}): {exc}") from exc
        with self._lock:
            first = not s.oom_reported
            s.oom_reported = True
            if self._slots.get("candidate") is s:
                self._slots.pop("candidate")
                self._retire_locked(s)
        if first:
            self._close_if_idle(s, wait=False)  # on the event loop: never block it
            self._fire(self._oom_event("candidate", s.ref, s.digest, "request", exc))
        log.warning("candidate %s out of memory; request retried on live", s.ref)
        try:
            return await self.generate("live", prompt_ids, params)
        except SlotError:
            raise Overloaded(self.retry_after_s, f"candidate {s.ref} out of memory and no live "
                             "slot to retry on") from exc

    def _oom_event(self, slot, ref, digest, phase, exc) -> OOMEvent:
        dev = self.device_memory()
        held = self._held()
        ev = OOMEvent(slot=slot, ref=ref, digest=digest, phase=phase,
                      injected=isinstance(exc, InjectedOOM), error=str(exc), device=str(self.device),
                      free_bytes=available_bytes(dev, held), budget_bytes=self.budget_bytes, held=held,
                      at=time.time())
        self.events = (self.events + [ev])[-32:]
        return ev

    def _fire(self, ev: OOMEvent) -> None:
        if self.on_oom is None:
            return
        try:
            self.on_oom(ev)
        except Exception:  # reporting must never turn a retried request into a failure
            log.exception("on_oom callback failed")

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
                    load_s=round(s.load_s, 4), loaded_at=s.loaded_at,
                    adapter_of=s.bundle.manifest.adapter.base_ref if s.bundle.manifest.adapter else None,
                    engine_shared_with=tuple(sorted(o.name for o in named.values()
                                                    if o is not s and o.engine is s.engine)))
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


def _params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        return SamplingParams(**params)
    return params


def _json(path):
    return json.loads(path.read_text())
