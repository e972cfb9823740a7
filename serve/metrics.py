"""Ray metrics (exported to Prometheus and the Ray dashboard), labelled by bundle and slot.

    slotserve_requests_total{bundle,slot,status}       finished requests (ok|error|cancelled)
    slotserve_request_latency_ms{bundle,slot}          end-to-end latency histogram
    slotserve_ttft_ms{bundle,slot}                     time to first token histogram
    slotserve_tokens_generated_total{bundle,slot}      completion tokens (rate() = tokens/s)
    slotserve_safety_hits_total{bundle,slot}
    slotserve_slot_memory_bytes{bundle,slot,tier,kind} held | shared | gpu (pynvml, CUDA only)
    slotserve_traffic_weight{bundle,slot}              percent of routed traffic
    slotserve_rollbacks_total{trigger}                 manual | guard | oom

Outside a Ray worker the metrics are no-ops, so the handler and the tests do not
depend on Ray.
"""

from __future__ import annotations

import functools
import logging

from slotserve import SLOT_NAMES

log = logging.getLogger("slotserve.metrics")

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class _Noop:
    def inc(self, *a, **k): ...
    def observe(self, *a, **k): ...
    def set(self, *a, **k): ...


class Metrics:
    def __init__(self, replica: str = ""):
        self.replica = replica
        self._series: dict[tuple[str, tuple], float] = {}   # gauge series set by `slots`
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram
            if not ray.is_initialized():
                raise RuntimeError("ray not initialised")
        except Exception:
            self.requests = self.latency = self.ttft = self.tokens = self.safety = _Noop()
            self.memory = self.weight = self.rollbacks = _Noop()
            return
        bs = ("bundle", "slot")
        self.requests = Counter("slotserve_requests_total", "finished requests",
                                tag_keys=bs + ("status",))
        self.latency = Histogram("slotserve_request_latency_ms", "request latency (ms)",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=bs)
        self.ttft = Histogram("slotserve_ttft_ms", "time to first token (ms)",
                              boundaries=LATENCY_BOUNDARIES_MS, tag_keys=bs)
        self.tokens = Counter("slotserve_tokens_generated_total", "completion tokens", tag_keys=bs)
        self.safety = Counter("slotserve_safety_hits_total", "safety filter hits", tag_keys=bs)
        self.memory = Gauge("slotserve_slot_memory_bytes", "bytes a slot holds",
                            tag_keys=bs + ("tier", "kind"))
        self.weight = Gauge("slotserve_traffic_weight", "percent of routed traffic", tag_keys=bs)
        self.rollbacks = Counter("slotserve_rollbacks_total", "rollbacks by trigger",
                                 tag_keys=("trigger",))

    def observe(self, o, safety_hit: bool = False) -> None:
        tags = {"bundle": o.view.ref, "slot": o.slot}
        status = "cancelled" if o.cancelled else ("ok" if o.ok else "error")
        self.requests.inc(1, {**tags, "status": status})
        if o.ok:
            self.latency.observe(o.latency_s * 1e3, tags)
            if o.ttft_s is not None:
                self.ttft.observe(o.ttft_s * 1e3, tags)
        if o.completion_tokens:
            self.tokens.inc(o.completion_tokens, tags)
        if safety_hit:
            self.safety.inc(1, tags)

    def slots(self, slot_state: dict, views: dict, weights: dict) -> None:
        """Gauges from the slot manager's state (bytes held/shared, tier) and the weights.

        A series that disappeared (a bundle released, or moved to another slot) is set to 0:
        Ray gauges cannot drop a series, and a stale one would keep saying e.g. that two
        bundles each take 100% of live's traffic."""
        now = slot_series(slot_state, views, weights)
        for gauge, tags in self._series.keys() - now.keys():
            getattr(self, gauge).set(0.0, dict(tags))
        for (gauge, tags), value in now.items():
            getattr(self, gauge).set(value, dict(tags))
        self._series = now

    def rollback(self, trigger: str) -> None:
        self.rollbacks.inc(1, {"trigger": trigger})


def slot_series(slot_state: dict, views: dict, weights: dict) -> dict[tuple[str, tuple], float]:
    """{(gauge attribute, sorted tag items): value} for the slots that hold a bundle now."""
    out: dict[tuple[str, tuple], float] = {}

    def put(gauge: str, value: float, **tags) -> None:
        out[(gauge, tuple(sorted(tags.items())))] = float(value)

    for slot, view in views.items():
        info = _slot_info(slot_state, slot)
        tier = str(info.get("tier", "device"))
        for kind, key in (("held", "held_bytes"), ("shared", "shared_bytes")):
            v = info.get(key)
            if isinstance(v, (int, float)):
                put("memory", v, bundle=view.ref, slot=slot, tier=tier, kind=kind)
        put("weight", weights.get(slot, 0.0), bundle=view.ref, slot=slot)
    for slot, gpu in gpu_bytes_by_slot(slot_state).items():
        if slot in views:
            put("memory", gpu, bundle=views[slot].ref, slot=slot, tier="gpu", kind="gpu")
    return out


def _slot_info(slot_state: dict, slot: str) -> dict:
    slots = slot_state.get("slots", slot_state) if isinstance(slot_state, dict) else {}
    info = slots.get(slot) if isinstance(slots, dict) else None
    return info if isinstance(info, dict) else {}


@functools.lru_cache(maxsize=1)
def _has_nvml() -> bool:
    """Whether NVML (a GPU driver) answers; asked once, not at every gauge refresh."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return True
    except Exception:
        return False


def gpu_bytes_by_slot(slot_state: dict) -> dict[str, int]:
    """GPU bytes per slot where a GPU is present (pynvml for the device total; the slot
    manager's per-slot figures split it). Empty without a GPU."""
    if not _has_nvml():
        return {}
    out = {}
    for slot in SLOT_NAMES:
        info = _slot_info(slot_state, slot)
        if info.get("tier", "device") in ("device", "gpu", "cuda") and isinstance(info.get("held_bytes"), int):
            out[slot] = info["held_bytes"]
    return out
