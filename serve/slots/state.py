"""What the slot manager reports: frozen state, swap results, OOM events, errors, and the
byte accounting behind "held" and "shared".

Accounting rule: a tensor storage used by several slots (tensor-pool dedup) is *held*
by the oldest-loaded slot that uses it and *shared* by the others, so the sum of held
bytes is what the slots really occupy, and a bundle that changes only its prompt or
serving config shows held weight bytes ~ 0, shared = its weight size. When the holder
is released, the next oldest becomes the holder: the figures are recomputed per call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class SlotError(ValueError):
    """A slot operation that cannot apply to the current slots; the message says why."""


class Overloaded(RuntimeError):
    """Shed load (HTTP 429 with Retry-After): live ran out of memory, nothing crashed."""

    def __init__(self, retry_after_s: float, message: str = "overloaded"):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> float:  # the name slotserve.api.handler reads
        return self.retry_after_s


@dataclass(frozen=True)
class Swap:
    action: str                  # "promote" | "rollback"
    live: str                    # ref now live
    previous: str | None         # ref now previous
    released: str | None         # ref dropped by the swap (promote drops the old previous)
    seconds: float
    reason: str = ""


@dataclass(frozen=True)
class OOMEvent:
    """An out-of-memory in a slot, with the memory figures at the time (for the ledger)."""

    slot: str                    # "candidate" on the guarded path
    ref: str
    digest: str
    phase: str                   # "load" | "request"
    injected: bool               # faults.oom_after drill vs a real torch.OutOfMemoryError
    error: str
    device: str
    free_bytes: int
    budget_bytes: int | None
    held: dict[str, int]         # device bytes held per slot when it happened
    at: float                    # unix time

    def as_dict(self) -> dict:
        return {"kind": "oom", **asdict(self)}


@dataclass(frozen=True)
class SlotInfo:
    name: str
    ref: str                     # name:version
    digest: str
    tier: str                    # device | host | moving
    held_bytes: int              # weights held (not shared) + KV pool
    shared_bytes: int            # weight bytes held by an older slot and used by this one
    weight_bytes: int            # all weight bytes this slot's engine uses
    kv_bytes: int                # its own KV pool (never shared: KV is per digest)
    faults: dict[str, Any]       # the drill faults set in serving.json ({} when none)
    path: str                    # lean | transformers
    inflight: int
    load_s: float
    loaded_at: float
    adapter_of: str | None = None          # an adapter version: its base (the ref it was published on)
    engine_shared_with: tuple[str, ...] = ()   # other slots decoding in the same engine (one base)

    @property
    def held_weight_bytes(self) -> int:
        return self.held_bytes - self.kv_bytes


@dataclass(frozen=True)
class SlotsState:
    device: str
    budget_bytes: int | None
    free_bytes: int | None       # what the planner would offer the next load
    slots: dict[str, SlotInfo] = field(default_factory=dict)   # occupied slots only
    draining: tuple[str, ...] = ()                            # released, requests finishing
    oom_events: int = 0

    def __getitem__(self, name: str) -> SlotInfo:
        return self.slots[name]

    def __contains__(self, name: str) -> bool:
        return name in self.slots


@dataclass(frozen=True)
class Acc:
    weight_bytes: int
    shared_bytes: int
    kv_bytes: int
    device_bytes: int            # held bytes that sit on the planning device

    @property
    def held_bytes(self) -> int:
        return self.weight_bytes - self.shared_bytes + self.kv_bytes


def account(slots, device) -> dict[int, Acc]:
    """id(slot) -> Acc, attributing each storage to the oldest slot that uses it."""
    owner: dict[tuple, int] = {}
    engines: set[int] = set()   # an engine shared by slots (adapter versions): its KV pool counts once
    out = {}
    for s in sorted(slots, key=lambda s: s.seq):
        storages: dict[tuple, int] = {}
        for t in s.engine.runner.weights():
            if t is not None:
                st = t.untyped_storage()
                storages.setdefault((st.data_ptr(), str(t.device)), st.nbytes())
        weight = sum(storages.values())
        shared = sum(n for k, n in storages.items() if k in owner)
        on_device = sum(n for k, n in storages.items() if k not in owner and k[1] == str(device))
        for k in storages:
            owner.setdefault(k, s.seq)
        kv = s.engine.memory().kv_bytes if id(s.engine) not in engines else 0
        engines.add(id(s.engine))
        # a LoRA adapter's stacked tensors are this slot's own (adapters.by_name: the unpadded size)
        name = s.adapter if s.adapter is not None else getattr(s.engine, "default_adapter", None)
        adapters = getattr(s.engine, "adapters", None)
        lora = adapters.by_name[name].nbytes if name and adapters is not None and name in adapters.by_name else 0
        weight += lora
        out[id(s)] = Acc(weight, shared, kv, on_device + kv + (lora if str(s.engine.device) == str(device) else 0))
    return out
