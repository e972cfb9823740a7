"""What a replica is told at start: `Settings` (the deployment's init args) and the
slot manager they describe.

Settings are JSON-able because Ray Serve passes them to every replica; `from_dict`
refuses unknown keys naming the valid ones, so a typo in a Serve config fails loudly
instead of being ignored. `make_manager` builds the default SlotManager, or the class
`manager: "module:Class"` names (tests swap in their own that way).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields

from slotserve.bundles.store import Store
from slotserve.slots import SlotManager
from slotserve.slots.planner import parse_size


@dataclass(frozen=True)
class Settings:
    """What a replica needs to know; the deployment's init args (JSON-able)."""

    store: str | None = None             # store root (path shared by every node)
    bundle: str | None = None            # initial live bundle when no state is persisted
    device: str = "cpu"
    memory_budget: str | int | None = None
    app: str = "slotserve"
    deployment: str = "SlotServe"
    served_name: str | None = None       # logical model name; default: the live bundle's name
    admin_token_sha256: str | None = None
    max_inflight: int = 256              # per replica; more is a 429 with Retry-After
    report_interval_s: float = 0.1
    manager: str | None = None           # "module:Class" with SlotManager's interface (tests); default SlotManager

    @classmethod
    def from_dict(cls, d: dict | None) -> "Settings":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def make_manager(settings: Settings):
    """The slot manager `settings` describe (store, device, memory budget, class)."""
    cls = SlotManager
    if settings.manager:
        mod, _, name = settings.manager.partition(":")
        cls = getattr(importlib.import_module(mod), name)
    budget = parse_size(settings.memory_budget) if settings.memory_budget not in (None, "") else None
    return cls(Store(settings.store), device=settings.device, memory_budget_bytes=budget)
