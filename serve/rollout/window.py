"""Per-slot metric windows: what happened on each slot since the current step began.

The rollout resets every window at each step start (and at promote/rollback), so a
window is "since step start" and live and candidate are always compared over the same
span of time. Counts are exact; latency percentiles use the most recent `max_samples`
requests (memory stays bounded on a long step). Recording is thread-safe (request
handlers call it concurrently); `snapshot(now)` returns a frozen `WindowMetrics` that
the pure decision layer (`slotserve.rollout.guards`) reads.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from slotserve.rollout.shadow import ShadowDiff


@dataclass(frozen=True)
class RequestOutcome:
    """One finished request (or mirrored shadow request) on one slot."""

    slot: str  # live | candidate | previous
    bundle: str  # name:version that answered
    latency_ms: float
    ttft_ms: float | None = None  # None when not streamed / not measured
    ok: bool = True
    oom: bool = False
    nan: bool = False  # NaN/inf logits or output
    safety_hit: bool = False
    tokens: int = 0


@dataclass(frozen=True)
class WindowMetrics:
    slot: str
    bundle: str | None
    started_at: float
    duration_s: float
    requests: int = 0
    errors: int = 0
    error_rate: float | None = None  # None: no samples (a guard cannot judge it)
    latency_samples: int = 0  # successful requests only: fast failures would flatter p99
    p50_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    ttft_samples: int = 0
    p50_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    oom_events: int = 0
    nan_count: int = 0
    nan_rate: float | None = None
    safety_hits: int = 0
    safety_hit_rate: float | None = None
    tokens: int = 0
    feedback: int = 0
    thumbs_down: int = 0
    thumbs_down_rate: float | None = None
    shadow_comparisons: int = 0  # diffs with a defined disagreement
    shadow_disagreement: float | None = None  # mean ShadowDiff.disagreement
    shadow_length_samples: int = 0
    shadow_length_ratio: float | None = None  # mean len(shadow)/len(live)
    eval_items: int = 0
    eval_score: float | None = None

    _SAMPLES = {
        "error_rate": "requests", "nan_rate": "requests", "safety_hit_rate": "requests",
        "oom_events": "requests", "p50_latency_ms": "latency_samples",
        "p99_latency_ms": "latency_samples", "p50_ttft_ms": "ttft_samples",
        "p99_ttft_ms": "ttft_samples", "thumbs_down_rate": "feedback",
        "shadow_disagreement": "shadow_comparisons", "shadow_length_ratio": "shadow_length_samples",
        "eval_score": "eval_items",
    }

    def value(self, metric: str) -> float | None:
        v = getattr(self, metric)
        return None if v is None else float(v)

    def samples(self, metric: str) -> int:
        """How many observations stand behind `metric` (compared with a guard's min_samples)."""
        return getattr(self, self._SAMPLES[metric])

    @classmethod
    def empty(cls, slot: str, now: float = 0.0, bundle: str | None = None) -> "WindowMetrics":
        return cls(slot=slot, bundle=bundle, started_at=now, duration_s=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 1]) of an already sorted list."""
    if not sorted_xs:
        return None
    i = min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))
    return sorted_xs[i]


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


class MetricWindow:
    """Mutable recorder for one slot; `snapshot` freezes it."""

    def __init__(self, slot: str, bundle: str | None = None, started_at: float = 0.0,
                 max_samples: int = 10_000) -> None:
        self.slot = slot
        self.max_samples = max_samples
        self._lock = threading.Lock()
        self.reset(started_at, bundle)

    def reset(self, now: float, bundle: str | None = None) -> None:
        """Start a new window; with `bundle`, outcomes from any other bundle are dropped
        (a slow request that began before a swap must not count against the new one)."""
        with self._lock:
            self.bundle, self.started_at = bundle, now
            self._n = self._errors = self._oom = self._nan = self._safety = self._tokens = 0
            self._lat: deque[float] = deque(maxlen=self.max_samples)
            self._ttft: deque[float] = deque(maxlen=self.max_samples)
            self._feedback = self._down = 0
            self._dis_sum, self._dis_n, self._len_sum, self._len_n = 0.0, 0, 0.0, 0
            self._eval: tuple[float, int] | None = None

    def _mine(self, bundle: str | None) -> bool:
        return self.bundle is None or bundle is None or bundle == self.bundle

    def record(self, o: RequestOutcome) -> bool:
        """Count a finished request; False when it belongs to another bundle (ignored)."""
        if not self._mine(o.bundle):
            return False
        with self._lock:
            self._n += 1
            self._errors += not o.ok
            self._oom += o.oom
            self._nan += o.nan
            self._safety += o.safety_hit
            self._tokens += o.tokens
            if o.ok:
                self._lat.append(float(o.latency_ms))
                if o.ttft_ms is not None:
                    self._ttft.append(float(o.ttft_ms))
        return True

    def record_feedback(self, positive: bool, bundle: str | None = None) -> bool:
        """A thumbs up (True) or down (False) from POST /v1/feedback."""
        if not self._mine(bundle):
            return False
        with self._lock:
            self._feedback += 1
            self._down += not positive
        return True

    def record_shadow(self, diff: ShadowDiff) -> None:
        with self._lock:
            d = diff.disagreement
            if d is not None:
                self._dis_sum, self._dis_n = self._dis_sum + d, self._dis_n + 1
            if diff.length_ratio is not None:
                self._len_sum, self._len_n = self._len_sum + diff.length_ratio, self._len_n + 1

    def set_eval(self, score: float, items: int) -> None:
        assert 0.0 <= score <= 1.0 and items >= 0
        with self._lock:
            self._eval = (score, items)

    def snapshot(self, now: float) -> WindowMetrics:
        with self._lock:
            lat, ttft, n = sorted(self._lat), sorted(self._ttft), self._n
            ev = self._eval
            return WindowMetrics(
                slot=self.slot, bundle=self.bundle, started_at=self.started_at,
                duration_s=max(0.0, now - self.started_at), requests=n, errors=self._errors,
                error_rate=_rate(self._errors, n), latency_samples=len(lat),
                p50_latency_ms=percentile(lat, 0.50), p99_latency_ms=percentile(lat, 0.99),
                ttft_samples=len(ttft), p50_ttft_ms=percentile(ttft, 0.50),
                p99_ttft_ms=percentile(ttft, 0.99), oom_events=self._oom, nan_count=self._nan,
                nan_rate=_rate(self._nan, n), safety_hits=self._safety,
                safety_hit_rate=_rate(self._safety, n), tokens=self._tokens,
                feedback=self._feedback, thumbs_down=self._down,
                thumbs_down_rate=_rate(self._down, self._feedback),
                shadow_comparisons=self._dis_n,
                shadow_disagreement=self._dis_sum / self._dis_n if self._dis_n else None,
                shadow_length_samples=self._len_n,
                shadow_length_ratio=self._len_sum / self._len_n if self._len_n else None,
                eval_items=ev[1] if ev else 0, eval_score=ev[0] if ev else None,
            )


class WindowSet:
    """The windows of one replica, by slot name; outcomes for other slots are ignored."""

    def __init__(self, slots: Iterable[str] = ("live", "candidate"), now: float = 0.0,
                 max_samples: int = 10_000) -> None:
        self.windows = {s: MetricWindow(s, None, now, max_samples) for s in slots}

    def __getitem__(self, slot: str) -> MetricWindow:
        return self.windows[slot]

    def reset(self, now: float, bundles: Mapping[str, str | None] | None = None) -> None:
        for slot, w in self.windows.items():
            w.reset(now, (bundles or {}).get(slot))

    def record(self, o: RequestOutcome) -> bool:
        w = self.windows.get(o.slot)
        return w.record(o) if w is not None else False

    def snapshot(self, now: float) -> dict[str, WindowMetrics]:
        return {s: w.snapshot(now) for s, w in self.windows.items()}
