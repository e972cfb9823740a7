"""One serving replica without Ray or HTTP: it converges its slots to the controller's
desired state, reports back, and is what the HTTP edge (slotserve.api) serves."""

from slotserve.replica.controller_link import LocalController, RayController
from slotserve.replica.replica import Replica
from slotserve.replica.settings import Settings

__all__ = ["Replica", "Settings", "LocalController", "RayController"]
