"""Aborting a slot load that is in flight, so a rollback never waits for a candidate.

A load holds the slot manager's memory lock for its whole duration (seconds for a big
bundle). A rollback to a parked previous needs that lock to copy previous back; an
operator pressing rollback must not wait for the candidate they are rolling away from.
So each load carries a `LoadTicket`; the rollback calls `ticket.abort(why)` and the
load stops at its next checkpoint, frees what it built and raises `LoadAborted`.

Checkpoints are places where stopping is known to be clean:
* between the load's phases (open, plan/park, engine, tokenizer, place), in the manager;
* before every weight tensor is read, via `AbortablePool.acquire`: that call runs inside
  the engine loader's try block, whose cleanup drops every pool claim and tensor the
  half-built engine made. Weight reading is most of a load, so this is what makes an
  abort prompt. Only the loader thread of that load sees its ticket (thread-local), so
  an unpark or another load using the same pool is never interrupted by it.
The KV pool allocation, CUDA graph capture and the transformers fallback have no
checkpoint inside: an abort there takes effect when they return.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Hashable, Iterator

import torch

from slotserve.engine.weights import TensorPool
from slotserve.slots.state import SlotError


class LoadAborted(SlotError):
    """A load stopped on purpose (a rollback needed the memory); nothing of it remains."""


class LoadTicket:
    """One load's abort flag. Thread-safe; aborting twice keeps the first reason."""

    def __init__(self, ref: str, slot: str):
        self.ref, self.slot = ref, slot
        self._why: str | None = None
        self._lock = threading.Lock()

    @property
    def aborted(self) -> bool:
        return self._why is not None

    def abort(self, why: str) -> bool:
        """Ask the load to stop; True if this call did (False: already asked)."""
        with self._lock:
            if self._why is not None:
                return False
            self._why = why
            return True

    def check(self) -> None:
        """Raise LoadAborted if an abort was asked for (call only where stopping is clean)."""
        if self._why is not None:
            raise LoadAborted(f"loading {self.ref} into {self.slot} was aborted: {self._why}; "
                              "nothing of it was kept (load it again once that is done)")


_current = threading.local()   # .ticket: the ticket of the load running on this thread


@contextlib.contextmanager
def checked_by(ticket: LoadTicket) -> Iterator[None]:
    """Within this block, on this thread, every `AbortablePool.acquire` checks `ticket`."""
    prev = getattr(_current, "ticket", None)
    _current.ticket = ticket
    try:
        yield
    finally:
        _current.ticket = prev


class AbortablePool(TensorPool):
    """The slot manager's tensor pool: a TensorPool whose `acquire` is a load checkpoint."""

    def acquire(self, key: Hashable, owner: object, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        ticket = getattr(_current, "ticket", None)
        if ticket is not None:
            ticket.check()   # before touching the pool: nothing to undo for this tensor
        return super().acquire(key, owner, make)
