"""What a replica tells the controller between reports: the outbox half of `Replica`.

`Outbox` is mixed into `Replica` (serve/replica.py). Request outcomes (for the rollout
windows), feedback, shadow diffs and OOM events are queued in `outbox`; the report
loop sends them with the replica's status. The queue is bounded (`MAX_OUTBOX`, oldest
dropped): a controller that is away must not make the replica run out of memory.
An OOM event wakes the report loop at once: the controller reverts traffic everywhere.

Uses the replica's `safety`, `metrics`, `_wake` and `_loop`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

from slotserve.api.bundle_view import BundleView
from slotserve.api.handler import Outcome

MAX_OUTBOX = 20_000


class Outbox:
    """The outbox half of `Replica`: events queued for the controller's next report."""

    def _observe(self, o: Outcome) -> None:
        if o.kind == "eval":
            return  # eval-gate traffic is judged by its score, not by the windows
        oom = o.error_kind in ("OutOfMemoryError", "InjectedOOM") if o.error_kind else False
        nan = o.error_kind == "FloatingPointError" or "non-finite" in (o.error or "")
        safety_hit = bool(o.ok and self.safety is not None and o.text and self.safety(o.text))
        rec = {"slot": o.slot, "bundle": o.view.ref, "latency_ms": o.latency_s * 1e3,
               "ttft_ms": None if o.ttft_s is None else o.ttft_s * 1e3,
               "ok": o.ok or o.cancelled, "oom": oom, "nan": nan, "safety_hit": safety_hit,
               "tokens": o.completion_tokens}
        if not o.cancelled:  # a client that went away says nothing about the bundle
            self._push({"kind": "request", "outcome": rec})
        if self.metrics is not None:
            self.metrics.observe(o, safety_hit)

    def _on_oom(self, ev) -> None:
        """The slot manager released a candidate after out of memory: tell the controller
        now (it reverts traffic everywhere and records the figures in the ledger)."""
        self._push({"kind": "oom", "released": ev.slot == "candidate", **_jsonable(ev)})
        self._poke()

    def _poke(self) -> None:
        """Wake the report loop; safe from the loader thread too."""
        loop = self._loop
        if loop is None:
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._wake.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(self._wake.set)

    def feedback(self, slot: str | None, view: BundleView, positive: bool, rid: str | None = None) -> None:
        # the response id lets the controller count a response once across replicas
        self._push({"kind": "feedback", "slot": slot, "bundle": view.ref, "positive": positive, "id": rid})

    def shadow(self, diff, view: BundleView) -> None:
        self._push({"kind": "shadow", "bundle": view.ref, "diff": asdict(diff)})

    def _push(self, ev: dict) -> None:
        self.outbox.append(ev)
        if len(self.outbox) > MAX_OUTBOX:
            del self.outbox[: len(self.outbox) - MAX_OUTBOX]


def _jsonable(x: Any):
    """`x` (dataclasses included) as plain JSON values."""
    return json.loads(json.dumps(x, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                 else str(o)))
