"""Loading a bundle into a slot off the serving path: the loader thread, building the
slot's engine and tokenizer (`SlotLoader`), and aborting a load in flight (`LoadTicket`).

A candidate loads while live serves, on the same CPU cores (2 on the dev box) and the
same Python process. Two things keep live's latency flat while it happens:
* the work runs in a fresh thread whose OS priority is lowered (`nice`), so when both
  want a core the live engine's step thread wins. Linux applies setpriority() to a
  single thread when given its native id, and threads it starts (torch's OpenMP
  workers for this caller) inherit it. A fresh thread is used because an unprivileged
  process cannot raise a thread's priority back: a pooled thread would stay slow;
* the tokenizer is loaded with `trust_remote_code=False`, and the engine reads only
  safetensors (never pickle).

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
import itertools
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Hashable, Iterator, TypeVar

import torch

from slotserve.engine import Engine
from slotserve.engine.weights import TensorPool
from slotserve.slots.faults import FaultInjector, Faults
from slotserve.slots.slot import Slot
from slotserve.slots.state import SlotError

log = logging.getLogger("slotserve.slots")
T = TypeVar("T")


class SlotLoader:
    """Builds slots for one slot manager: in the throttled low-priority loader thread, with
    the manager's shared tensor pool, numbering slots in load order (the accounting
    attributes a storage several slots share to the oldest)."""

    def __init__(self, device, pool: "AbortablePool", *, nice: int = 10, slice_s: float = 0.0005,
                 pause_s: float = 0.005):
        self.device, self.pool = device, pool
        self.nice = nice                      # loads run at lower CPU priority than serving
        self.slice_s, self.pause_s = slice_s, pause_s   # GIL duty cycle (see run_in_loader_thread)
        self._seq = itertools.count()

    def run(self, fn: Callable[[], T], busy: Callable[[], bool] | None = None) -> T:
        """`fn()` in a new low-priority loader thread, throttled while `busy()`."""
        return run_in_loader_thread(fn, self.nice, self.slice_s, self.pause_s, busy)

    def build(self, bundle, name: str, faults: Faults, kv_cache_tokens: int, ticket: "LoadTicket",
              resident: Callable[[], list[Slot]], started: float) -> Slot:
        """The bundle's engine (weights through the shared pool, a checkpoint before each
        tensor is read) and tokenizer (shared with a resident slot when its files are
        identical), its faults attached -> a Slot named `name`, not placed anywhere yet."""
        injector = FaultInjector(faults, bundle.digest)
        injector.on_load()  # faults.oom_after == 0 drills an OOM right here
        with checked_by(ticket):   # a checkpoint before each weight tensor is read
            engine = load_engine(bundle.path, self.device, self.pool, kv_cache_tokens)
        try:
            ticket.check()
            tokenizer = same_tokenizer(bundle, resident()) or load_tokenizer(bundle)
            ticket.check()
        except BaseException:
            engine.close()
            raise
        if tokenizer is not None:
            engine.use_tokenizer(tokenizer)   # response_format / forced tool calls compile against it
        injector.install(engine)
        return Slot(name, bundle, engine, tokenizer, faults=faults, injector=injector,
                    seq=next(self._seq), load_s=time.perf_counter() - started)


    def join(self, bundle, name: str, host: Slot, ticket: "LoadTicket", resident: Callable[[], list[Slot]],
             started: float) -> Slot:
        """A slot for `bundle` on `host`'s engine (slotserve.slots.share.can_share said yes):
        its adapter is added to that engine (between two steps), nothing else is built."""
        from slotserve.slots.share import EngineShare
        from slotserve.slots.state import SlotError

        ticket.check()
        share = host.share or EngineShare(host.engine, host)
        m = bundle.manifest
        adapter = m.ref if m.adapter is not None else ""   # "": the plain base model
        if adapter and adapter not in host.engine.adapters.names:
            try:
                host.engine.add_adapter(adapter, bundle.path / "adapter")
            except ValueError as exc:
                raise SlotError(f"cannot load {m.ref}: its adapter does not fit {host.ref}'s engine: {exc}") from None
        try:
            ticket.check()
            tokenizer = same_tokenizer(bundle, resident()) or load_tokenizer(bundle)
        except BaseException:
            if adapter and not any(s.adapter == adapter for s in share.users):
                host.engine.remove_adapter(adapter)
            raise
        host.share = share
        s = Slot(name, bundle, host.engine, tokenizer, seq=next(self._seq), load_s=time.perf_counter() - started,
                 adapter=adapter, share=share)
        share.join(s)
        return s


def run_in_loader_thread(fn: Callable[[], T], nice: int = 10, slice_s: float = 0.0005,
                         pause_s: float = 0.005, busy: Callable[[], bool] | None = None) -> T:
    """Run `fn` in a new low-priority thread; block until it returns; re-raise its error.

    The GIL, not the cores, is what a load steals from serving: a tiny model's decode
    step is mostly Python, and a thread waiting for the GIL waits up to a whole switch
    interval (5 ms); a big model's load also competes for cores and memory bandwidth.
    So the loader is cooperative: while `busy()` says requests are running, after each
    `slice_s` of work (checked at every Python or C call boundary, so a long tensor copy
    counts in full) it sleeps pause_s × (time run / slice_s): a slice/(slice+pause)
    duty cycle (~9% by default). When nothing is running it loads at full speed.
    slice_s=0 turns this off.
    """
    box: dict = {}

    def target():
        if nice > 0:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except (OSError, AttributeError) as exc:  # not Linux, or forbidden: just slower
                log.debug("could not lower loader priority: %s", exc)
        if slice_s > 0:
            sys.setprofile(_yielder(slice_s, pause_s, busy or (lambda: True)))  # this thread only
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            sys.setprofile(None)

    t = threading.Thread(target=target, name="slotserve-loader", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _yielder(slice_s: float, pause_s: float, busy: Callable[[], bool]):
    clock, sleep = time.perf_counter, time.sleep
    resumed = [clock()]

    def hook(frame, event, arg):  # called on every Python/C call and return
        now = clock()
        ran = now - resumed[0]
        if ran >= slice_s:
            if busy():
                # Pause in proportion to how long we ran (one tensor cast can take far
                # longer than a slice), so the duty cycle holds for C work too. The
                # sleep drops the GIL: the serving threads take it meanwhile.
                sleep(pause_s * ran / slice_s)
            resumed[0] = clock()
    return hook


def load_engine(bundle_path: Path, device, pool, kv_cache_tokens: int, enforce_eager: bool = False):
    """The bundle's engine on `device`, its weights through the shared tensor pool.

    kv_cache_tokens comes from the planner (serving.json rounded to blocks), so the
    engine allocates exactly what was planned. enforce_eager: skip CUDA graph capture
    (capturing beside a running engine is fine: each engine captures on its own stream)."""
    return Engine.from_pretrained(bundle_path, device=str(device), tensor_pool=pool,
                                  kv_cache_tokens=kv_cache_tokens, enforce_eager=enforce_eager)


def load_tokenizer(bundle):
    """The bundle's own tokenizer (tokenizer/ dir); never runs code from the bundle."""
    tdir = Path(bundle.path) / "tokenizer"
    if not (tdir / "tokenizer.json").exists() and not (tdir / "tokenizer_config.json").exists():
        log.warning("%s has no tokenizer/ directory; serving token ids only", bundle.path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tdir), trust_remote_code=False)


def same_tokenizer(bundle, slots):
    """A resident slot's tokenizer when the bundle's tokenizer/ files are byte-identical
    (most new versions keep their tokenizer): saves its memory and load time. Safe to
    share: the serving layer already uses one tokenizer from many requests at once."""
    def tok_files(b):
        return {r: e for r, e in b.manifest.files.items() if r.startswith("tokenizer/")}
    mine = tok_files(bundle)
    for s in slots if mine else ():
        if s.tokenizer is not None and tok_files(s.bundle) == mine:
            return s.tokenizer
    return None


def shared_fn(bundle, slots):
    """-> shared(file, tensor): is that tensor already in the tensor pool? True when a
    resident lean slot on the device loaded the same weight file with the same config
    and serving dtype (the pool keys tensors by file sha256 + dtype + device)."""
    files = bundle.manifest.files
    dtype = bundle.serving.get("dtype")
    resident = set()
    for s in slots:
        other = s.bundle.manifest.files
        if s.engine.path == "lean" and s.tier == "device" and not s.engine.closed \
                and other.get("model/config.json") == files.get("model/config.json") \
                and s.bundle.serving.get("dtype") == dtype:
            resident |= {rel for rel, e in other.items() if files.get(rel) == e}
    return lambda file, tensor: f"model/{file}" in resident


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
