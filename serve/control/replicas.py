"""What the controller knows of its replicas: each one's last report (applied version,
slots, errors, in-flight requests, what it is loading), which are still alive, and
whether the serving ones have converged on a desired-state version."""

from __future__ import annotations

from typing import Callable

from slotserve.control.state import ReplicaInfo

REPLICA_TTL_S = 10.0       # a replica not heard from for this long is gone
CONVERGE_TTL_S = 3.0       # convergence waits only for replicas heard from this recently
                           # (a serving replica reports at least every second)
REPORTED = ("node", "applied", "routed", "ready", "slots", "error", "inflight", "loading")


class ReplicaTracker:
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.replicas: dict[str, ReplicaInfo] = {}

    def report(self, replica_id: str, status: dict) -> ReplicaInfo:
        info = self.replicas.setdefault(replica_id, ReplicaInfo(replica_id))
        info.seen = self.clock()
        for k in REPORTED:
            if k in status:
                setattr(info, k, status[k])
        return info

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def active(self) -> list[ReplicaInfo]:
        """Replicas heard from within REPLICA_TTL_S (the others are dropped)."""
        now = self.clock()
        for rid in [r.id for r in self.replicas.values() if now - r.seen > REPLICA_TTL_S]:
            del self.replicas[rid]
        return list(self.replicas.values())

    def recent(self) -> list[ReplicaInfo]:
        """Replicas heard from within CONVERGE_TTL_S: the ones serving now (a killed one
        drops out of this long before REPLICA_TTL_S forgets it)."""
        now = self.clock()
        return [r for r in self.active() if now - r.seen <= CONVERGE_TTL_S]

    def convergence(self, version: int, loaded: bool = True) -> tuple[bool, list[str]]:
        """(all serving replicas applied `version`, errors reported for it). With
        loaded=False a replica still loading a candidate counts once it routes as
        `version` says (a rollback does not wait for an unrelated load)."""
        now = self.clock()
        reps = [r for r in self.active()
                if (r.ready or r.applied >= 0) and now - r.seen <= CONVERGE_TTL_S]
        errors = [f"{r.id}: {r.error['message']}" for r in reps
                  if r.error and r.error.get("version", -1) >= version]
        done = bool(reps) and all((r.applied if loaded else max(r.applied, r.routed)) >= version
                                  for r in reps if not r.error or r.error.get("version", -1) < version)
        return done, errors
