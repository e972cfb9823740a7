"""The live / previous / candidate slots of one replica: `SlotManager`, the memory planner,
the loader thread and injected faults.

    from slotserve.slots import SlotManager
    mgr = SlotManager(store, device="cpu")
    mgr.load("support-bot:2"); mgr.promote(); mgr.rollback("p99 breach")
"""

from slotserve.slots.loader import LoadAborted
from slotserve.slots.manager import SlotManager
from slotserve.slots.planner import MemoryPlanError
from slotserve.slots.slot import Slot, SlotUnavailable
from slotserve.slots.state import Overloaded, SlotError, SlotsState

__all__ = ["SlotManager", "Slot", "SlotsState", "SlotError", "SlotUnavailable", "Overloaded", "LoadAborted",
           "MemoryPlanError"]
