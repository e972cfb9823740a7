"""Tiers: where a slot's tensors live — on the serving device, or parked in host memory.

When the GPU cannot hold `previous` next to live and a candidate, the slot manager parks
previous: its weights move to pinned host memory (so the copy back is one fast DMA),
its KV pool is dropped (an idle engine's KV holds nothing worth keeping) and so are its
CUDA graphs (they point at the old addresses). Rolling back to it copies the weights
back, allocates a fresh KV pool and recaptures the graphs — safe while live serves,
since each engine captures on its own stream in thread-local mode.

Only tensors the engine holds *exclusively* move: a tensor it shares with another
engine through the tensor pool stays where it is (moving it would free nothing, and
that engine still computes with it); `ParkState.shared_bytes` reports how much stayed.
On CPU, "host" is the same memory as "device"; parking there clones the exclusive
tensors anyway so tests exercise exactly the code path the GPU takes.

This module is policy only (pin on CUDA); the moving is `Engine.park` / `Engine.unpark`.
"""

from __future__ import annotations

import torch

from slotserve.engine.parking import ParkState

Parked = ParkState      # what a parked Slot keeps in `slot.parked`


def storage_key(t: torch.Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def park(engine, pin_memory: bool | None = None) -> ParkState:
    """Park an idle `engine` (weights to host, pinned on CUDA; KV pool and graphs freed).

    Returns what was done; `moved_bytes` is 0 when everything it uses is shared with
    another engine. The engine refuses requests until `unpark`.
    """
    if pin_memory is None:
        pin_memory = engine.device.type == "cuda"
    engine.park(pin_memory=pin_memory)
    return engine.parked


def unpark(engine) -> int:
    """Bring a parked engine back to its device (weights, KV pool, CUDA graphs) -> bytes copied."""
    return engine.unpark()
