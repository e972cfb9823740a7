"""One engine serving several slots: a base model and LoRA adapter versions of it.

When an adapter version is loaded while its base (or another adapter version of the same
base) sits in a slot, the new slot joins that slot's engine instead of building one: it
costs the adapter's bytes (no second KV pool, no second set of weights), and its requests
decode in the same batches as the other slot's, each row with its own adapter.
`EngineShare` owns who uses the engine: a slot that leaves removes its adapter, and the
last one to leave closes the engine. Promote and rollback never touch it (they move
names between Slot objects); releasing one of the slots leaves the others serving.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("slotserve.slots")

# serving.json keys the engine is built from: versions that share an engine must agree on them
ENGINE_KEYS = ("dtype", "max_model_len", "max_batch", "kv_cache_tokens", "kv_cache_bytes", "max_prefill_tokens",
               "enable_prefix_caching")


def engine_base(bundle) -> str:
    """Digest of the full model bundle whose weights `bundle`'s engine computes with."""
    m = bundle.manifest
    return m.adapter.base if m.adapter is not None else m.digest


def can_share(bundle, slot) -> bool:
    """Whether `bundle` may join `slot`'s engine: the same base weights, the same engine
    settings, the lean path, on the device, and no drill faults on either (faults hook the
    whole engine: they must never reach a version that did not declare them)."""
    if bundle.manifest.adapter is None and slot.bundle.manifest.adapter is None:
        return False   # two full bundles: the tensor pool already shares what is identical
    return (engine_base(bundle) == engine_base(slot.bundle) and slot.tier == "device" and not slot.closed
            and slot.engine.path == "lean" and not bundle.manifest.has_faults and not slot.bundle.manifest.has_faults
            and all(bundle.serving.get(k) == slot.bundle.serving.get(k) for k in ENGINE_KEYS))


class EngineShare:
    def __init__(self, engine, first_slot):
        self.engine = engine
        self.users = [first_slot]
        self._lock = threading.Lock()

    def join(self, slot) -> None:
        with self._lock:
            self.users.append(slot)

    def others(self, slot) -> list:
        with self._lock:
            return [s for s in self.users if s is not slot]

    def leave(self, slot) -> None:
        """`slot` is done with the engine (released and idle): drop its adapter; close the
        engine when no slot is left."""
        with self._lock:
            if slot not in self.users:
                return
            self.users.remove(slot)
            last = not self.users
        if last:
            self.engine.close()
        elif slot.adapter and slot.adapter in self.engine.adapters.names \
                and not any(s.adapter == slot.adapter for s in self.others(slot)):
            try:
                self.engine.remove_adapter(slot.adapter)
            except ValueError:   # requests still in flight on it (cancelled ones finishing): keep it
                log.warning("adapter %s still in use; kept in the shared engine", slot.adapter)
