"""One slot: a loaded bundle (engine + tokenizer + faults), and the requests running on it.

A `Slot` is a live resource, not a value: the manager moves the *same* object between
the names live/previous/candidate (so `name` and `tier` change), and a request holds
the object itself, never a name, so it finishes on the engine it started on however
the names move meanwhile. The engine closes only once the slot is released *and* its
last request has left (`_enter`/`_exit` count them).

`SlotRequest` is what `SlotManager.generate` returns: an async token iterator that
applies the OOM guard mid-flight — an out-of-memory failure on a candidate before any
token reached the caller is retried on live (by the manager's guard), so the caller sees a
normal answer; `slot` then names the slot that really answered.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import torch

from slotserve.slots.faults import FaultInjector, Faults

class SlotUnavailable(RuntimeError):
    """The slot was released or is parked/moving; route the request elsewhere."""


@dataclass(eq=False)
class Slot:
    name: str                      # current role: live | previous | candidate
    bundle: Any                    # OpenedBundle (path, manifest)
    engine: Any                    # slotserve.engine.Engine; KV cache is per engine = per digest
    tokenizer: Any                 # transformers tokenizer from the bundle's tokenizer/ dir
    tier: str = "device"           # device | host (parked) | moving (being parked/unparked)
    faults: Faults = field(default_factory=Faults)
    injector: FaultInjector | None = None
    seq: int = 0                   # load order: shared tensors are "held" by the oldest slot
    load_s: float = 0.0            # seconds the load took (open, plan, engine, tokenizer)
    loaded_at: float = field(default_factory=time.time)
    parked: Any = None             # the engine's ParkState while tier == "host"
    released: bool = False
    oom_reported: bool = False     # on_oom fires once per slot
    # Sharing another slot's engine (slotserve.slots.share): the adapter its requests name
    # ("" = the plain base; None = the engine's own default) and who else uses the engine.
    adapter: str | None = None
    share: Any = None              # EngineShare, or None while this slot has its engine alone
    _closed: bool = False
    _inflight: int = 0
    _cv: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def ref(self) -> str:
        return self.bundle.manifest.ref

    @property
    def digest(self) -> str:
        return self.bundle.manifest.digest

    @property
    def inflight(self) -> int:
        return self._inflight

    def _enter(self) -> None:
        with self._cv:
            if self.released:
                raise SlotUnavailable(f"{self.name} ({self.ref}) was released")
            if self.tier != "device":
                raise SlotUnavailable(f"{self.name} ({self.ref}) is parked in host memory "
                                      "(tier 'host'); roll back to it to serve it again")
            self._inflight += 1

    def _exit(self) -> None:
        with self._cv:
            self._inflight -= 1
            assert self._inflight >= 0
            last = self._inflight == 0
            self._cv.notify_all()
        if last and self.released:
            # The last request of a released slot frees the engine. Off-thread: this
            # may run on the event loop, and close() joins the engine's step thread.
            threading.Thread(target=self.close, name="slotserve-slot-close", daemon=True).start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._inflight == 0, timeout)

    @property
    def closed(self) -> bool:
        return self._closed or self.engine.closed

    @property
    def shares_engine(self) -> bool:
        return self.share is not None and bool(self.share.others(self))

    def submit(self, prompt_ids, params):
        """Submit to the engine, naming this slot's adapter when the engine is shared."""
        if self.adapter is None:
            return self.engine.submit(prompt_ids, params)
        return self.engine.submit(prompt_ids, params, adapter=self.adapter)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.share is not None:
            self.share.leave(self)    # the engine closes with its last slot
        elif not self.engine.closed:
            self.engine.close()

    def __repr__(self) -> str:
        return (f"Slot({self.name}, {self.ref}, tier={self.tier}, inflight={self._inflight}"
                f"{', released' if self.released else ''})")


class SlotRequest:
    """A running generation on a slot. Async-iterate for token ids; `result()` for all.

    Attributes the serving layer reads: `slot` (the Slot answering now — live after a
    candidate OOM retry), `first_slot`, `retried`, `finish_reason`, `output_ids`.
    """

    def __init__(self, slot: Slot, handle, prompt_ids: list[int], params,
                 retry_on_oom: Callable[[Slot, BaseException, list[int], Any], Awaitable["SlotRequest"]]):
        self._retry_on_oom = retry_on_oom     # the manager's OOM guard: release a candidate, retry on live
        self.slot = self.first_slot = slot
        self._handle = handle
        self.prompt_ids, self.params = prompt_ids, params
        self.output_ids: list[int] = []
        self.retried = False
        self._exited = False

    @property
    def finish_reason(self) -> str | None:
        return self._handle.finish_reason

    @property
    def logprobs(self) -> list:
        """The engine's TokenLogprob per output token (when the request asked for logprobs)."""
        return self._handle.logprobs

    @property
    def prompt_logprobs(self) -> list:
        """The engine's TokenLogprob per prompt token after the first (params.prompt_logprobs)."""
        return self._handle.prompt_logprobs

    @property
    def done(self) -> bool:
        return self._handle.done

    @property
    def cached_tokens(self) -> int:
        return getattr(self._handle, "cached_tokens", 0)

    def _leave(self) -> None:
        if not self._exited:
            self._exited = True
            self.slot._exit()

    def cancel(self) -> None:
        """Stop generating, free the KV blocks, let the slot go (idempotent)."""
        self._handle.cancel()
        self._leave()

    def __aiter__(self) -> AsyncIterator[int]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[int]:
        try:
            while True:
                try:
                    async for tok in self._handle:
                        self.output_ids.append(tok)
                        yield tok
                    return
                except torch.OutOfMemoryError as exc:
                    if self.output_ids:  # the client already has tokens: cannot re-answer
                        raise
                    failed = self.slot
                    self._leave()
                    # Raises Overloaded for live; for a candidate: report, retry on live.
                    other = await self._retry_on_oom(failed, exc, self.prompt_ids, self.params)
                    self.slot, self._handle, self._exited = other.slot, other._handle, False
                    self.retried = True
                    other._exited = True  # this request now owns the live slot's count
        finally:
            if not self._handle.done:
                self._handle.cancel()
            self._leave()

    async def result(self) -> list[int]:
        async for _ in self:
            pass
        return list(self.output_ids)

    def __del__(self):  # a request dropped without iterating must not pin its slot forever
        try:
            if not self._exited:
                self._handle.cancel()
                self._leave()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"SlotRequest({self.slot.name}:{self.slot.ref}, tokens={len(self.output_ids)}, "
                f"retried={self.retried}, finish_reason={self.finish_reason!r})")
