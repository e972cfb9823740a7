"""Requests on slots, with the OOM guard: the request half of `SlotManager` (serve/slots.py).

`SlotRequests` is mixed into `SlotManager`. `generate` enters a slot under the routing
lock (so a release cannot slip in between), applies the slot's injected faults and
submits to its engine. Out of memory on a candidate — at submit, or mid-stream through
`SlotRequest` — releases the candidate, fires `on_oom` once with the memory figures and
retries the request on live; out of memory on live or previous sheds load instead
(`Overloaded`, a 429 with Retry-After): those are never released for it.

Uses the manager's `_lock`, `_slots`, `on_oom`, `retry_after_s`, `events`, the
accounting of `SlotMemory` and the retirement of released slots in `SlotManager`.
"""

from __future__ import annotations

import logging
import time

import torch

from slotserve.slots.faults import InjectedOOM
from slotserve.slots.planner import available_bytes
from slotserve.slots.slot import Slot, SlotRequest
from slotserve.slots.state import OOMEvent, Overloaded, SlotError

log = logging.getLogger("slotserve.slots")


class SlotRequests:
    """The request half of `SlotManager`: generate, and the OOM guard around it."""

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
            handle = s.engine.submit(prompt_ids, params)
        except torch.OutOfMemoryError as exc:
            s._exit()
            req = await self._after_oom(s, exc, prompt_ids, params)
            req.first_slot, req.retried = s, True
            return req
        except BaseException:
            s._exit()
            raise
        return SlotRequest(self, s, handle, list(prompt_ids), params)

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


def _params(params):
    from slotserve.engine import SamplingParams

    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        return SamplingParams(**params)
    return params
