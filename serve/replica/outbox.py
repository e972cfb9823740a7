"""What a replica tells the controller between reports: its `Outbox`, and the `Outcome`s
of finished requests that fill it.

Request outcomes (for the rollout windows), feedback, shadow diffs and OOM events are
queued here; the report loop sends them with the replica's status. The queue is bounded
(`MAX_OUTBOX`, oldest dropped): a controller that is away must not make the replica run
out of memory. An OOM event wakes the report loop at once: the controller reverts
traffic everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from slotserve.control.state import jsonable
from slotserve.replica.bundle_view import BundleView

MAX_OUTBOX = 20_000


@dataclass
class Outcome:
    """One finished (or failed) generation, for windows, metrics and shadow diffs."""

    slot: str
    view: BundleView
    kind: str                        # "chat" | "completion" | "shadow" | "eval"
    ok: bool
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    error: str | None = None
    error_kind: str | None = None    # exception class name
    greedy: bool = False
    cancelled: bool = False


class Outbox:
    """Events queued for the controller's next report (`take`), bounded."""

    def __init__(self, metrics=None, wake: Callable[[], None] = lambda: None):
        self.events: list[dict] = []
        self.safety = None               # the desired state's safety filter, run on every answer
        self.metrics = metrics
        self._wake = wake                # wakes the report loop (safe from any thread)

    def observe(self, o: Outcome) -> None:
        """A finished request: queued for the rollout windows, counted in the metrics."""
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
            self.push({"kind": "request", "outcome": rec})
        if self.metrics is not None:
            self.metrics.observe(o, safety_hit)

    def oom(self, ev) -> None:
        """The slot manager released a candidate after out of memory: tell the controller
        now (it reverts traffic everywhere and records the figures in the ledger)."""
        self.push({"kind": "oom", "released": ev.slot == "candidate", **jsonable(ev)})
        self._wake()

    def feedback(self, slot: str | None, view: BundleView, positive: bool, rid: str | None = None) -> None:
        # the response id lets the controller count a response once across replicas
        self.push({"kind": "feedback", "slot": slot, "bundle": view.ref, "positive": positive, "id": rid})

    def shadow(self, diff, view: BundleView) -> None:
        self.push({"kind": "shadow", "bundle": view.ref, "diff": asdict(diff)})

    def push(self, ev: dict) -> None:
        self.events.append(ev)
        if len(self.events) > MAX_OUTBOX:
            del self.events[: len(self.events) - MAX_OUTBOX]

    def take(self) -> list[dict]:
        """Everything queued, for a report; the queue starts empty again."""
        events, self.events = self.events, []
        return events

    def put_back(self, events: list[dict]) -> None:
        """A report that failed: its events go first again (the newest kept within the bound)."""
        self.events = (events + self.events)[-MAX_OUTBOX:]
