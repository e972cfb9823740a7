"""One serving replica without Ray or HTTP: it converges its slots to the controller's
desired state, reports back, and is what the HTTP edge (slotserve.api) serves: its
slots as bundle views, how requests are routed, and where their outcomes go."""

from slotserve.replica.backend import Routing
from slotserve.replica.bundle_view import BundleView
from slotserve.replica.controller_link import LocalController, RayController
from slotserve.replica.outbox import Outcome
from slotserve.replica.replica import Replica
from slotserve.replica.settings import Settings

__all__ = ["Replica", "Settings", "LocalController", "RayController", "BundleView", "Routing", "Outcome"]
