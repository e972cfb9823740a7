"""Injected faults for drills and tests, declared in a bundle's serving.json.

    "faults": {"latency_ms": 200, "error_rate": 0.3, "oom_after": 5, "nan_logits": true}

Each is optional. They exist so every rollout guard (latency, errors, OOM, NaN) can be
exercised on a CPU with tiny bundles. A `FaultInjector` belongs to one slot (one
loaded bundle): its request counter and RNG restart when the bundle is loaded again.
The RNG is seeded from the bundle digest, so a test that sends the same requests sees
the same failures every run.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch

FAULT_KEYS = ("latency_ms", "error_rate", "oom_after", "nan_logits")


class InjectedError(RuntimeError):
    """A request failed on purpose (faults.error_rate); the serving layer maps it to 5xx."""


class InjectedOOM(torch.OutOfMemoryError):
    """faults.oom_after: subclass so callers that catch torch.OutOfMemoryError catch it,
    while tests and the ledger can still tell a drill from a real one."""


@dataclass(frozen=True)
class Faults:
    latency_ms: float = 0.0       # added to every request before it is submitted
    error_rate: float = 0.0       # fraction of requests raising InjectedError
    oom_after: int | None = None  # the Nth request (1-based) and all later ones OOM;
                                  # 0 means the load itself OOMs
    nan_logits: bool = False      # every logit row becomes NaN (via engine.logits_hook)

    def __post_init__(self):
        if not (isinstance(self.latency_ms, (int, float)) and self.latency_ms >= 0):
            raise ValueError(f"faults.latency_ms must be a number >= 0, got {self.latency_ms!r}")
        if not (isinstance(self.error_rate, (int, float)) and 0.0 <= self.error_rate <= 1.0):
            raise ValueError(f"faults.error_rate must be in [0, 1], got {self.error_rate!r}")
        if self.oom_after is not None and not (
                isinstance(self.oom_after, int) and not isinstance(self.oom_after, bool)
                and self.oom_after >= 0):
            raise ValueError(f"faults.oom_after must be an integer >= 0 (0: the load OOMs, "
                             f"N: the Nth request on), got {self.oom_after!r}")
        if not isinstance(self.nan_logits, bool):
            raise ValueError(f"faults.nan_logits must be true or false, got {self.nan_logits!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | list | None) -> "Faults":
        if isinstance(d, list):  # serving.json may list faults one per object: merge them
            merged: dict = {}
            for item in d:
                if not isinstance(item, Mapping) or set(item) & set(merged):
                    raise ValueError(f"faults list must hold objects with distinct keys from "
                                     f"{list(FAULT_KEYS)}, got {d!r}")
                merged.update(item)
            d = merged
        if d is not None and not isinstance(d, Mapping):
            raise ValueError(f"faults must be an object with keys {list(FAULT_KEYS)}, got {d!r}")
        d = dict(d or {})
        unknown = sorted(set(d) - set(FAULT_KEYS))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}: valid keys are {list(FAULT_KEYS)}")
        return cls(**d)

    @classmethod
    def from_serving(cls, serving: Mapping[str, Any] | None) -> "Faults":
        return cls.from_dict((serving or {}).get("faults"))

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.error_rate or self.oom_after is not None
                    or self.nan_logits)

    def as_dict(self) -> dict:
        """Only the faults that are set (what `state()` and `bundle show` print)."""
        default = Faults()
        return {f.name: v for f in fields(self)
                if (v := getattr(self, f.name)) != getattr(default, f.name)}


def _seed(digest: str | int) -> int:
    if isinstance(digest, int):
        return digest
    hexpart = str(digest).split(":")[-1]
    try:
        return int(hexpart[:16], 16)
    except ValueError:  # not hex: still deterministic, and stable across processes
        return int.from_bytes(str(digest).encode()[:8].ljust(8, b"\0"), "little")


class FaultInjector:
    """Per-slot fault state: a request counter and a digest-seeded RNG."""

    def __init__(self, faults: Faults, seed: str | int = 0):
        self.faults = faults
        self._rng = random.Random(_seed(seed))
        self._lock = threading.Lock()  # requests arrive from many threads/tasks
        self.requests = 0

    def _draw(self) -> tuple[float, BaseException | None]:
        """Advance the counter; return (delay seconds, exception to raise or None)."""
        f = self.faults
        with self._lock:
            self.requests += 1
            n = self.requests
            # Draw on every request, even with error_rate 0, so the sequence of
            # failures depends only on the request index, not on other settings.
            roll = self._rng.random()
        if f.oom_after is not None and f.oom_after > 0 and n >= f.oom_after:
            return 0.0, InjectedOOM(
                f"injected out of memory (faults.oom_after={f.oom_after}, request {n})")
        if roll < f.error_rate:
            return f.latency_ms / 1e3, InjectedError(
                f"injected error (faults.error_rate={f.error_rate}, request {n})")
        return f.latency_ms / 1e3, None

    def before_request(self) -> None:
        """Blocking form: sleep the injected latency, then raise if this request fails."""
        delay, exc = self._draw()
        if delay:
            time.sleep(delay)
        if exc is not None:
            raise exc

    async def before_request_async(self) -> None:
        """Event-loop form: the latency is an await, so other requests keep running."""
        delay, exc = self._draw()
        if delay:
            await asyncio.sleep(delay)
        if exc is not None:
            raise exc

    def on_load(self) -> None:
        """Called while a slot loads this bundle: oom_after=0 drills an OOM at load."""
        if self.faults.oom_after == 0:
            raise InjectedOOM("injected out of memory while loading (faults.oom_after=0)")

    def logits_hook(self, logits: torch.Tensor) -> torch.Tensor:
        """NaN every logit row: what a numerically broken checkpoint looks like."""
        return torch.full_like(logits, float("nan"))

    def install(self, engine) -> None:
        """Attach the engine-side faults (NaN logits) to this slot's engine."""
        if self.faults.nan_logits:
            engine.logits_hook = self.logits_hook

    def __repr__(self) -> str:
        return f"FaultInjector({asdict(self.faults)}, requests={self.requests})"
