"""Prometheus metrics: every metric name is defined here, and one scrape of `/metrics` on the
API port sees the whole app.

Per replica (each series also labelled `replica`; `bundle` = name:version, `slot`):

    slotserve_requests_total{bundle,slot,status}          finished requests (ok|error|cancelled)
    slotserve_request_latency_seconds{bundle,slot}        end-to-end latency histogram (ok requests)
    slotserve_time_to_first_token_seconds{bundle,slot}    time to first token histogram
    slotserve_inter_token_latency_seconds{bundle,slot}    a request's mean gap between tokens, histogram
    slotserve_prompt_tokens_total{bundle,slot}            prompt tokens of finished requests
    slotserve_tokens_generated_total{bundle,slot}         completion tokens (rate() = tokens/s)
    slotserve_safety_hits_total{bundle,slot}
    slotserve_slot_swaps_total{action}                    promote | rollback swaps this replica made
    slotserve_requests_running{bundle,slot}               sequences the slot's engine is decoding
    slotserve_requests_waiting{bundle,slot}               sequences queued for admission
    slotserve_kv_cache_usage_ratio{bundle,slot}           used KV blocks / all blocks (0..1)
    slotserve_prefix_cache_queries_total{bundle,slot}     prompt tokens admitted for prefill
    slotserve_prefix_cache_hits_total{bundle,slot}        ... of which the prefix cache served
    slotserve_slot_memory_bytes{bundle,slot,tier,kind}    held | shared bytes; tier device|host|moving
    slotserve_traffic_weight{bundle,slot}                 percent of routed traffic

Per app (the controller's, no `replica` label):

    slotserve_rollbacks_total{trigger}                    manual | guard | oom
    slotserve_rollout_info{bundle,live,strategy,phase}    1 while a rollout is shown
    slotserve_rollout_step{bundle}                        index of the current step (0-based)
    slotserve_rollout_candidate_requests{bundle}          candidate requests in the step's window
    slotserve_rollout_guard_value{bundle,guard,action}    the candidate's guarded metric now
    slotserve_rollout_guard_threshold{bundle,guard,action}
    slotserve_rollout_guard_breached{bundle,guard,action} 1 when breached with enough samples

Why this shape: Ray Serve's proxy sends a scrape of `/metrics` to one replica, and the
replicas are separate processes, possibly on other nodes. Ray's own metrics export on
another port per node with a `ray_` prefix; prometheus_client's multiprocess mode (what
vLLM uses for its API-server processes) shares mmap files in one directory, which cannot
span the nodes of a Ray cluster. Here each replica sends a snapshot of its registry with
its report to the controller (at most every `PUSH_S`), the controller keeps the latest of
each live replica, and the replica answering a scrape renders its own families (read
now) with the others' snapshots and the controller's families. So the other replicas'
series are up to `PUSH_S` plus the report interval old, and a replica that stopped
reporting disappears with its series (Prometheus sees its counters end).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.core import Metric

from slotserve import SLOT_NAMES

log = logging.getLogger("slotserve.metrics")

PUSH_S = 1.0                  # a replica sends its snapshot to the controller at most this often
# The classic text format every Prometheus reads (the names here need none of 1.0.0's UTF-8).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BUNDLE_SLOT = ("bundle", "slot")
GUARD_LABELS = ("bundle", "guard", "action")

# A family as it travels from a replica to the controller and back: JSON-able.
#   [name, type, help, [[sample name, {label: value}, value], ...]]
Family = list


@dataclass(frozen=True)
class SlotReading:
    """What the gauges say about one occupied slot, read when the registry is collected."""

    slot: str
    bundle: str
    tier: str
    held_bytes: int | None
    shared_bytes: int | None
    weight: float
    engine: Mapping[str, Any]     # slotserve.engine.Engine.stats(); {} when unreadable


def read_slots(mgr, weights: Mapping[str, float]) -> list[SlotReading]:
    """The slot manager's occupied slots now: bytes and tier from its state, queue and KV
    figures from each slot's engine."""
    state = mgr.state()
    infos = getattr(state, "slots", {}) or {}
    out = []
    for name in SLOT_NAMES:
        s = mgr.get(name)
        if s is None:
            continue
        info = infos.get(name)
        try:
            stats = s.engine.stats()
        except Exception:   # a closing engine, or a test manager's stand-in
            stats = {}
        out.append(SlotReading(name, s.ref, str(getattr(info, "tier", "device")),
                               getattr(info, "held_bytes", None), getattr(info, "shared_bytes", None),
                               float(weights.get(name, 0.0)), stats))
    return out


class ReplicaMetrics:
    """One replica's registry: request counters and histograms it records, slot and engine
    gauges it reads from `source` (set by `watch`) whenever it is collected."""

    def __init__(self, replica: str):
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("slotserve_requests_total", "finished requests by status (ok|error|cancelled)",
                                BUNDLE_SLOT + ("status",), registry=r)
        self.latency = Histogram("slotserve_request_latency_seconds", "end-to-end latency of ok requests",
                                 BUNDLE_SLOT, buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("slotserve_time_to_first_token_seconds", "time to first token",
                              BUNDLE_SLOT, buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("slotserve_inter_token_latency_seconds",
                             "mean gap between the tokens of one request (one observation per request "
                             "with two tokens or more)", BUNDLE_SLOT, buckets=TOKEN_GAP_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("slotserve_prompt_tokens_total", "prompt tokens of finished requests",
                                     BUNDLE_SLOT, registry=r)
        self.tokens = Counter("slotserve_tokens_generated_total", "completion tokens", BUNDLE_SLOT, registry=r)
        self.safety = Counter("slotserve_safety_hits_total", "answers the safety filter flagged",
                              BUNDLE_SLOT, registry=r)
        self.swaps = Counter("slotserve_slot_swaps_total", "slot swaps this replica made (promote|rollback)",
                             ("action",), registry=r)
        self.source: Callable[[], Iterable[SlotReading]] = lambda: ()
        r.register(_SlotCollector(self))
        self._pushed_at = 0.0

    def watch(self, source: Callable[[], Iterable[SlotReading]]) -> None:
        """Read the slot gauges from `source()` at every collection."""
        self.source = source

    def observe(self, o, safety_hit: bool = False) -> None:
        """A finished request (slotserve.replica.outbox.Outcome)."""
        labels = (o.view.ref, o.slot)
        status = "cancelled" if o.cancelled else ("ok" if o.ok else "error")
        self.requests.labels(*labels, status).inc()
        if o.ok:
            self.latency.labels(*labels).observe(o.latency_s)
            if o.ttft_s is not None:
                self.ttft.labels(*labels).observe(o.ttft_s)
                if o.completion_tokens > 1:
                    self.itl.labels(*labels).observe(max(0.0, o.latency_s - o.ttft_s) / (o.completion_tokens - 1))
        if o.prompt_tokens:
            self.prompt_tokens.labels(*labels).inc(o.prompt_tokens)
        if o.completion_tokens:
            self.tokens.labels(*labels).inc(o.completion_tokens)
        if safety_hit:
            self.safety.labels(*labels).inc()

    def swap(self, action: str) -> None:
        self.swaps.labels(action).inc()

    def families(self) -> list[Family]:
        return families(self.registry)

    def snapshot_due(self, now: float | None = None) -> list[Family] | None:
        """The families to send with this report, or None if one went out less than PUSH_S ago."""
        now = time.monotonic() if now is None else now
        if now - self._pushed_at < PUSH_S:
            return None
        self._pushed_at = now
        return self.families()


class _SlotCollector:
    """The gauges read from the slots at collection time, so a slot that was released or
    a bundle that moved to another slot leaves no stale series behind."""

    def __init__(self, metrics: ReplicaMetrics):
        self.metrics = metrics

    def collect(self):
        try:
            readings = list(self.metrics.source())
        except Exception as exc:   # metrics must never break serving, nor the scrape
            log.debug("slot gauges not read: %s", exc)
            readings = []
        gauge = {name: Metric(name, doc, "gauge") for name, doc in (
            ("slotserve_requests_running", "sequences the slot's engine is decoding"),
            ("slotserve_requests_waiting", "sequences queued for admission"),
            ("slotserve_kv_cache_usage_ratio", "used KV-cache blocks / all blocks (0..1)"),
            ("slotserve_slot_memory_bytes", "bytes a slot holds (kind=held) or uses from an older slot (kind=shared)"),
            ("slotserve_traffic_weight", "percent of routed traffic"))}
        counter = {name: Metric(name, doc, "counter") for name, doc in (
            ("slotserve_prefix_cache_queries", "prompt tokens admitted for prefill"),
            ("slotserve_prefix_cache_hits", "prompt tokens the prefix cache served"))}
        for r in readings:
            bs = {"bundle": r.bundle, "slot": r.slot}
            e = r.engine
            if "running" in e:
                gauge["slotserve_requests_running"].add_sample("slotserve_requests_running", bs, e["running"])
                gauge["slotserve_requests_waiting"].add_sample("slotserve_requests_waiting", bs, e["waiting"])
            if e.get("total_blocks"):
                used = 1.0 - e["free_blocks"] / e["total_blocks"]
                gauge["slotserve_kv_cache_usage_ratio"].add_sample("slotserve_kv_cache_usage_ratio", bs, used)
            if "prompt_tokens" in e:
                counter["slotserve_prefix_cache_queries"].add_sample("slotserve_prefix_cache_queries_total", bs,
                                                                     e["prompt_tokens"])
                counter["slotserve_prefix_cache_hits"].add_sample("slotserve_prefix_cache_hits_total", bs,
                                                                  e["cached_prompt_tokens"])
            for kind, v in (("held", r.held_bytes), ("shared", r.shared_bytes)):
                if isinstance(v, (int, float)):
                    gauge["slotserve_slot_memory_bytes"].add_sample(
                        "slotserve_slot_memory_bytes", {**bs, "tier": r.tier, "kind": kind}, v)
            gauge["slotserve_traffic_weight"].add_sample("slotserve_traffic_weight", bs, r.weight)
        yield from gauge.values()
        yield from counter.values()


class ControllerMetrics:
    """The app-wide families: rollbacks counted where they are decided, and the rollout
    (phase, step, guard values) read from the controller's core at collection time."""

    def __init__(self, rollout_status: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.rollbacks = Counter("slotserve_rollbacks_total", "rollbacks by trigger (manual|guard|oom)",
                                 ("trigger",), registry=self.registry)
        self.registry.register(_RolloutCollector(rollout_status))

    def rollback(self, trigger: str) -> None:
        self.rollbacks.labels(trigger).inc()

    def families(self) -> list[Family]:
        return families(self.registry)


class _RolloutCollector:
    def __init__(self, status: Callable[[], dict]):
        self.status = status

    def collect(self):
        try:
            st = self.status()
        except Exception as exc:
            log.debug("rollout not read: %s", exc)
            st = {}
        info = Metric("slotserve_rollout_info", "1 while a rollout is shown (labels: its bundle, the live it "
                                                "started from, strategy, phase)", "gauge")
        step = Metric("slotserve_rollout_step", "index of the rollout's current step (0-based)", "gauge")
        reqs = Metric("slotserve_rollout_candidate_requests", "candidate requests in the step's window", "gauge")
        value = Metric("slotserve_rollout_guard_value", "the candidate's guarded metric now", "gauge")
        threshold = Metric("slotserve_rollout_guard_threshold", "the value the guard compares against", "gauge")
        breached = Metric("slotserve_rollout_guard_breached", "1 when the guard is breached with enough samples",
                          "gauge")
        if st.get("phase"):
            b = str(st.get("bundle"))
            info.add_sample("slotserve_rollout_info", {"bundle": b, "live": str(st.get("baseline")),
                                                       "strategy": str(st.get("strategy")),
                                                       "phase": str(st["phase"])}, 1.0)
            step.add_sample("slotserve_rollout_step", {"bundle": b}, float(st.get("step") or 0))
            if "requests" in st:
                reqs.add_sample("slotserve_rollout_candidate_requests", {"bundle": b}, float(st["requests"]))
            for g in st.get("guards") or ():
                labels = {"bundle": b, "guard": str(g["guard"]), "action": str(g["action"])}
                if g.get("value") is not None:
                    value.add_sample("slotserve_rollout_guard_value", labels, float(g["value"]))
                if g.get("threshold") is not None:
                    threshold.add_sample("slotserve_rollout_guard_threshold", labels, float(g["threshold"]))
                breached.add_sample("slotserve_rollout_guard_breached", labels,
                                    float(bool(g.get("breached")) and bool(g.get("enough_samples"))))
        yield from (info, step, reqs, value, threshold, breached)


def families(registry: CollectorRegistry) -> list[Family]:
    """The registry's families as JSON-able lists, without prometheus_client's `_created`
    series (a timestamp per series that dashboards do not use, and that would double the
    size of every snapshot)."""
    out = []
    for m in registry.collect():
        samples = [[s.name, dict(s.labels), float(s.value)] for s in m.samples if not s.name.endswith("_created")]
        out.append([m.name, m.type, m.documentation, samples])
    return out


def render(own: list[Family], replica: str, others: Mapping[str, list[Family]] | None = None,
           app: Iterable[Family] = ()) -> bytes:
    """The text exposition of the app: `own` (this replica's families) and `others`
    (replica id -> families) with a `replica` label, then the controller's `app` families.
    Families of one name are merged, as the format wants each name once."""
    merged: dict[str, Metric] = {}

    def add(fams: Iterable[Family], extra: dict) -> None:
        for name, type_, doc, samples in fams:
            m = merged.get(name)
            if m is None:
                m = merged[name] = Metric(name, doc, type_)
            for sname, labels, v in samples:
                m.add_sample(sname, {**labels, **extra}, v)

    add(own, {"replica": replica})
    others = others or {}
    for rid in sorted(others):
        if rid != replica:
            add(others[rid], {"replica": rid})
    add(app, {})
    return generate_latest(_Fixed(list(merged.values())))


class _Fixed:
    """A registry-shaped holder of finished families, for generate_latest."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)
