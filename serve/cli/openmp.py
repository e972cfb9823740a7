"""OpenMP settings for processes that run engines on the CPU, applied before torch loads.

torch's CPU ops run on libgomp thread teams, one team per calling thread. A serving
process has several such threads (each engine's step thread, the caller's), so it runs
more OpenMP threads than cores, and libgomp then sleeps idle workers after ~1000 spins:
every one of the hundreds of small parallel regions in a decode step pays a futex
wake-up. Measured on the 2-core dev VM (16 staggered requests, `bench_engine.py`):
engine throughput 194-218 tok/s by default, 240-268 tok/s with these settings; ACTIVE
alone (spin forever) was worse, 148-155, since spinners then starve the other threads.
So: spin (ACTIVE), but only ~1M iterations (a few ms) before sleeping, so an idle
server's workers still go to sleep.

libgomp reads these when it loads (with torch's C library), so `configure` must run
before the first `import torch`; values already in the environment win. The CLI calls it
(`slotserve serve`'s local Ray inherits the environment) and so does `bench_engine.py`;
importing slotserve as a library changes nothing.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "1000000"}


def configure(env=os.environ) -> dict[str, str]:
    """Fill in `DEFAULTS` the environment leaves unset -> what was set (empty once torch
    is loaded: too late to matter, and a later reader should not be misled)."""
    if "torch" in sys.modules:
        return {}
    added = {k: v for k, v in DEFAULTS.items() if k not in env}
    env.update(added)
    return added
