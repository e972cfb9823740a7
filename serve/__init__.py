"""slotserve: a GPU inference server with hot-swappable model slots and instant rollback.

The package maps three directories (see pyproject): serve/ -> slotserve,
kernels/ -> slotserve.kernels, bundles/ -> slotserve.bundles.
"""

__version__ = "0.1.0"
