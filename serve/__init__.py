"""slotserve: a GPU inference server with hot-swappable model slots and instant rollback.

The package maps three directories (see pyproject): serve/ -> slotserve,
kernels/ -> slotserve.kernels, bundles/ -> slotserve.bundles.
"""

__version__ = "0.1.0"

# The slots of every replica, in the order state and listings show them: the bundle that
# serves, the one a rollback returns to, and the one a rollout tries.
SLOT_NAMES = ("live", "previous", "candidate")
