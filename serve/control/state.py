"""What the controller and its replicas tell each other: the desired state — what sits
in live / previous / candidate, the traffic weights and the rollout phase
(`DesiredState`) — and what a replica reports back (`ReplicaInfo`). Plain dataclasses;
the controller persists them and replicas apply them. Anything else either side sends
(slot states, events, ledger metrics) goes through `jsonable` first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from slotserve import SLOT_NAMES

HEARTBEAT_S = 2.0          # a replica's watch() returns at least this often


@dataclass(frozen=True)
class SlotRef:
    ref: str      # name:version
    digest: str

    @property
    def name(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def version(self) -> int:
        return int(self.ref.rsplit(":", 1)[1])


@dataclass(frozen=True)
class DesiredState:
    version: int = 0
    live: SlotRef | None = None
    previous: SlotRef | None = None
    candidate: SlotRef | None = None
    weights: dict = field(default_factory=lambda: {"live": 100.0})
    mirror_fraction: float = 0.0
    salt: str = ""
    sticky_key: str = "none"
    safety: dict | None = None        # rollout spec's safety config (None: defaults)
    window_epoch: int = 0              # bumps when replicas must reset their windows
    rollout_phase: str | None = None
    evict_previous: bool = False       # the next candidate load may drop previous
    served_name: str | None = None     # the logical model name; stays when a bundle of
                                       # another name is promoted, so clients keep working
    reason: str = ""
    updated_at: float = 0.0

    def slot(self, name: str) -> SlotRef | None:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DesiredState":
        d = dict(d)
        for s in SLOT_NAMES:
            if d.get(s):
                d[s] = SlotRef(**d[s])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ReplicaInfo:
    id: str
    node: str = ""
    seen: float = 0.0
    applied: int = -1
    routed: int = -1                   # live/previous/weights of this version are in effect
    ready: bool = False
    slots: dict = field(default_factory=dict)
    error: dict | None = None          # {"version": v, "message": ...} for a failed apply
    inflight: int = 0
    loading: str | None = None         # what it is loading now (progress)


def jsonable(x):
    """`x` as plain JSON values (dataclasses as dicts, sets sorted, anything else as str)."""
    return json.loads(json.dumps(x, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                 else (sorted(o) if isinstance(o, (set, frozenset)) else str(o))))
