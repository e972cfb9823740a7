"""Pick a slot per request: a stable hash of the sticky key against the traffic weights.

`bucket(key, salt)` maps salt+key through blake2b to a point in [0, 100). `route`
lays the slots out on [0, 100) — the candidate first, then the others by name — and
returns the slot whose interval holds the point. So:
- sticky: the same key, weights and salt always give the same slot, on every replica
  (no Python `hash()`, which is salted per process);
- monotone: a key on the candidate at 5% is still on it at 25% (its point is below
  5, hence below 25), so users who moved do not bounce back as a ramp grows.
The rollout keeps one salt for its whole life (steps share it).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from typing import Mapping

CANDIDATE = "candidate"


def bucket(key: str, salt: str) -> float:
    """Uniform point in [0, 100) for salt+key."""
    h = hashlib.blake2b(f"{salt}\x1f{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 * 100.0


def _key(key: str | None, request_id: str | None) -> str:
    # No sticky key: hash the caller's per-request id (pure); with neither, a random one.
    if key is not None:
        return key
    return request_id if request_id is not None else uuid.uuid4().hex


def route(key: str | None, weights: Mapping[str, float], salt: str, request_id: str | None = None) -> str:
    """Slot for a request. `weights` are non-negative (percentages, or any scale)."""
    bad = {s: w for s, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"weights must be finite numbers >= 0; got {bad}")
    order = ([CANDIDATE] if weights.get(CANDIDATE, 0) > 0 else []) + sorted(
        s for s, w in weights.items() if w > 0 and s != CANDIDATE)
    if not order:
        raise ValueError(f"weights must give some slot a positive share; got {dict(weights)}")
    total = sum(weights[s] for s in order)
    point = bucket(_key(key, request_id), salt) / 100.0 * total
    edge = 0.0
    for s in order:
        edge += weights[s]
        if point < edge:
            return s
    return order[-1]  # float rounding at the very top of the range


def shadow_mirror(key: str | None, fraction: float, salt: str, request_id: str | None = None) -> bool:
    """Mirror this request to the candidate? Independent of `route` (own salt suffix)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    return fraction > 0 and bucket(_key(key, request_id), salt + "\x1fmirror") < fraction * 100.0


def sticky_value(sticky_key: str, headers: Mapping[str, str], body: Mapping | None = None) -> str | None:
    """The request's sticky key per the spec's `sticky_key` (header:NAME | body:FIELD | none).

    Header names are matched case-insensitively; a missing or empty value gives None.
    """
    if sticky_key == "none":
        return None
    kind, _, name = sticky_key.partition(":")
    if kind == "header":
        lname = name.lower()
        v = next((val for k, val in headers.items() if k.lower() == lname), None)
    elif kind == "body":
        v = (body or {}).get(name)
    else:
        raise ValueError(f"sticky_key {sticky_key!r} is not valid; use header:NAME, body:FIELD or none")
    return None if v is None or v == "" else str(v)
