"""Rollouts, decided by pure functions: the spec, the guards, the router, the metric
windows, the rollout state machine, shadow diffs, the safety filter and eval sets.
Nothing here does I/O on its own or holds a lock: the controller drives it."""

from slotserve.rollout.machine import ACTIVE, RolloutError, RolloutState
from slotserve.rollout.spec import RolloutSpec, SpecError

__all__ = ["RolloutSpec", "SpecError", "RolloutState", "RolloutError", "ACTIVE"]
