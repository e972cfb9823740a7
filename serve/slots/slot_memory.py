"""Device memory of the slots: the tier half of `SlotManager` (serve/slots.py).

`SlotMemory` is mixed into `SlotManager`. It moves a slot between the device and
(pinned) host memory — `park` / `unpark`, under the memory lock like a load, so the
planner always sees a consistent picture — and it measures what the slots hold: the
planner's `_held()` and `state()`'s figures come from `_accounting()`, which counts a
storage shared by several slots once, on the oldest (slotserve.slots.state.account).

Uses the manager's `_lock`, `_mem_lock`, `_slots`, `_draining`, `device`, `budget_bytes`.
"""

from __future__ import annotations

from slotserve.slots import tiers
from slotserve.slots.planner import LoadEstimate, device_memory, plan
from slotserve.slots.slot import Slot
from slotserve.slots.state import SlotError, account


class SlotMemory:
    """The tier half of `SlotManager`: park / unpark and the byte accounting."""

    def park(self, slot: str = "previous", timeout: float | None = 30.0) -> int:
        """Move `slot`'s exclusive tensors to (pinned) host memory; returns bytes moved.
        Waits for its in-flight requests; new ones are refused while it is parked."""
        if slot == "live":
            raise SlotError("live cannot be parked (it serves); park previous or candidate")
        with self._mem_lock:
            s = self.slot(slot)
            if s.tier == "host":
                return 0
            with s._cv:
                s.tier = "moving"
            if not s.wait_idle(timeout):
                s.tier = "device"
                raise SlotError(f"cannot park {slot}: {s.inflight} requests still running after {timeout}s")
            try:
                s.parked = tiers.park(s.engine)   # what another engine shares stays on the device
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
                n = tiers.unpark(s.engine)
            except BaseException:
                s.tier = "host"
                raise
            s.parked, s.tier = None, "device"
            return n

    def device_memory(self):
        return device_memory(str(self.device), self.budget_bytes)

    def _all_slots(self) -> list[Slot]:
        with self._lock:
            return list(self._slots.values()) + [d for d in self._draining if not d.engine.closed]

    def _accounting(self):
        """(slots by name, draining slots, their Acc by id, device bytes held per entry)."""
        with self._lock:
            named = dict(self._slots)
            draining = [d for d in self._draining if not d.engine.closed]
        acc = account(list(named.values()) + draining, self.device)
        held = {n: acc[id(s)].device_bytes for n, s in named.items()}
        held.update({f"released {d.ref}": acc[id(d)].device_bytes for d in draining})
        return named, draining, acc, held

    def _held(self) -> dict[str, int]:
        """Device bytes each slot holds (shared tensors counted once, on the oldest slot)."""
        return self._accounting()[3]
