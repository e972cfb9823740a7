"""Where the controller keeps what it decided, in the bundle registry: the desired state
and the rollout (the state row `serve:<app>`), the aliases `name@live|previous|candidate`
that follow it, and the ledger rows of every change.

The state row is written at once, before replicas are told, so a restart never undoes a
change they applied. The other writes (ledger rows, aliases; ~20 ms each with fsync) can
be deferred: queued, then `flush`ed by the actor off its event loop, so a rollback is
pushed without waiting on the disk.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from slotserve import SLOT_NAMES
from slotserve.control.state import DesiredState, jsonable
from slotserve.control.transitions import LedgerRow
from slotserve.rollout import machine as ro

log = logging.getLogger("slotserve.controller")


class StateStore:
    def __init__(self, registry, app: str, actor: str, *, defer_writes: bool = False):
        self.registry = registry
        self.key = f"serve:{app}"        # the registry's state row for this app
        self.actor = actor               # who the alias rows name
        self.defer_writes = defer_writes
        self._pending: list[Callable[[], Any]] = []

    def load(self) -> tuple[DesiredState, dict | None, ro.RolloutState | None]:
        """The persisted (state, rollout spec, rollout); an empty state when none was saved
        or the row is unreadable. An unreadable *registry* raises: starting empty would
        forget live and previous."""
        saved = self.registry.get_state(self.key)
        if saved is None:
            return DesiredState(), None, None
        try:
            # A rollout resumes where it was (wall-clock times); its windows start empty,
            # so the current step re-collects its samples before advancing.
            rollout = ro.RolloutState.from_dict(saved["rollout"]) if saved.get("rollout") else None
            return DesiredState.from_dict(saved["state"]), saved.get("rollout_spec"), rollout
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable state %s: %s", self.key, exc)
            return DesiredState(), None, None

    def save(self, state: DesiredState, rollout_spec: dict | None, rollout: ro.RolloutState | None) -> None:
        self.registry.put_state(self.key, {"state": state.to_dict(), "rollout_spec": rollout_spec,
                                           "rollout": rollout.to_dict() if rollout else None})
        self._write(lambda: self._sync_aliases(state))

    def record(self, row: LedgerRow, actor: str | None = None) -> None:
        args = (row.action, actor or self.actor, row.bundle, row.from_, row.to, row.reason,
                jsonable(row.metrics) if row.metrics else None)

        def write():
            try:
                self.registry.record(*args)
            except Exception as exc:  # the ledger must not take serving down
                log.error("ledger write failed (%s %s): %s", row.action, row.bundle, exc)
        self._write(write)

    @property
    def pending(self) -> bool:
        """Writes are queued (the actor schedules a `flush`)."""
        return bool(self._pending)

    def flush(self) -> None:
        """Run the queued registry writes in order."""
        while self._pending:
            batch, self._pending = self._pending, []
            for fn in batch:
                try:
                    fn()
                except Exception as exc:
                    log.error("registry write failed: %s", exc)

    def _write(self, fn: Callable[[], Any]) -> None:
        if self.defer_writes:
            self._pending.append(fn)
        else:
            fn()

    def _sync_aliases(self, state: DesiredState) -> None:
        """`name@live|previous|candidate` follow the desired state (so refs like
        support-bot@previous resolve, and `bundle show` says where a version serves)."""
        reg = self.registry
        holders = reg.aliases()
        why = state.reason or "state change"
        for slot in SLOT_NAMES:
            want = state.slot(slot)
            for name, aliases in holders.items():
                if slot in aliases and (want is None or name != want.name):
                    reg.clear_alias(name, slot, self.actor, reason=why)
            if want is not None and holders.get(want.name, {}).get(slot) != want.version:
                reg.set_alias(want.name, slot, want.version, self.actor, reason=why)

