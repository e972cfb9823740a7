"""The controller: one named Ray actor (`slotserve.control.controller.SlotController`)
around a plain-Python core that owns the desired state of every replica, decides admin
operations and rollout events as pure transitions, and persists them in the registry."""

from slotserve.control.core import ControllerCore
from slotserve.control.state import DesiredState, SlotRef
from slotserve.control.transitions import ControlError

__all__ = ["ControllerCore", "ControlError", "DesiredState", "SlotRef"]
