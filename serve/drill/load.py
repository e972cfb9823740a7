"""The drill's two clients: HTTP load that notes who answered, and a rollout monitor.

`drive` sends chat completions from `concurrency` workers (closed loop, or paced at
`rps`) until told to stop, and keeps one `Sample` per request: when it started and
ended (wall clock of this machine), the HTTP status, and the bundle that answered
(`x-slotserve-bundle`). `monitor` polls `GET /admin/rollout` and keeps one `Poll`
per answer: phase, weights, the candidate's window counts, and the server's clock
(window start + duration), from which the drill estimates the clock offset between
this machine and the server. Neither judges anything: slotserve.drill.report does.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import httpx

from slotserve.cli.admin import admin_result

PROMPTS = (
    "Tell me a short story about a lighthouse.",
    "What is the capital of France?",
    "Summarise the plot of a heist movie in one line.",
    "Give me three names for a grey cat.",
    "Explain rollbacks to a five year old.",
    "Write a haiku about warm caches.",
)


@dataclass(frozen=True)
class Sample:
    """One client request. Times are wall-clock seconds (time.time()) on this machine."""

    start: float
    end: float
    status: int              # HTTP status; 0 when no response came back (connection error, timeout)
    bundle: str | None       # x-slotserve-bundle (or the body's `model`)
    retried_from: str | None  # x-slotserve-retried-from, when the server sends it
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.bundle is not None

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass(frozen=True)
class Poll:
    """One answer of GET /admin/rollout. `server_now` is None when the answer holds no window."""

    sent: float
    received: float
    phase: str | None
    step: int | None
    weights: dict
    candidate: str | None
    started_at: float | None
    ended_at: float | None
    reason: str | None
    cand_requests: int | None    # the candidate's window (since the step began)
    cand_errors: int | None
    cand_oom: int | None
    cand_nan: int | None
    server_now: float | None

    @property
    def rtt(self) -> float:
        return self.received - self.sent


def _one_sample(start: float, r: httpx.Response | None, error: str | None) -> Sample:
    end = time.time()
    if r is None:
        return Sample(start, end, 0, None, None, error)
    bundle = r.headers.get("x-slotserve-bundle")
    retried = r.headers.get("x-slotserve-retried-from")
    if r.status_code != 200:
        msg = None
        try:
            msg = r.json().get("error", {}).get("message")
        except Exception:
            msg = r.text[:200]
        return Sample(start, end, r.status_code, bundle, retried, f"HTTP {r.status_code}: {msg}")
    if bundle is None:
        try:
            bundle = r.json().get("model")
        except Exception:
            pass
        if bundle is None:
            return Sample(start, end, 200, None, retried, "response names no bundle")
    return Sample(start, end, 200, bundle, retried, None)


async def _request(client: httpx.AsyncClient, model: str, i: int, max_tokens: int,
                   stream: bool) -> Sample:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    headers = {"x-session-id": f"drill-{i}"}  # a spec sticky on the session spreads users
    start = time.time()
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            return _one_sample(start, r, None)
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return _one_sample(start, r, None)
            done = False
            async for line in r.aiter_lines():
                if line.startswith("data:") and "[DONE]" in line:
                    done = True
                elif line.startswith("data:") and '"error"' in line:
                    return Sample(start, time.time(), 200, r.headers.get("x-slotserve-bundle"),
                                  r.headers.get("x-slotserve-retried-from"),
                                  f"error event in stream: {line[5:200].strip()}")
            s = _one_sample(start, r, None)
            if not done:
                return Sample(s.start, s.end, s.status, s.bundle, s.retried_from,
                              "stream ended without [DONE]")
            return s
    except httpx.HTTPError as exc:
        return _one_sample(start, None, f"{type(exc).__name__}: {exc}")


async def drive(url: str, model: str, *, concurrency: int, rps: float, stop: asyncio.Event,
                samples: list[Sample], max_tokens: int = 8, stream: bool = False,
                timeout_s: float = 60.0) -> None:
    """Send requests until `stop` is set; append a Sample per finished request."""
    assert concurrency >= 1
    counter = itertools.count()
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while not stop.is_set():
                i = next(counter)
                if rps > 0:  # paced: request i is due at t0 + i/rps (late when all workers are busy)
                    delay = t0 + i / rps - time.monotonic()
                    if delay > 0:
                        try:
                            await asyncio.wait_for(stop.wait(), delay)
                            return
                        except asyncio.TimeoutError:
                            pass
                samples.append(await _request(client, model, i, max_tokens, stream))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _poll_from(sent: float, received: float, d: dict) -> Poll:
    win = (d.get("windows") or {}).get("candidate") or {}
    server_now = None
    if win.get("started_at") is not None and win.get("duration_s") is not None:
        server_now = float(win["started_at"]) + float(win["duration_s"])
    return Poll(sent, received, d.get("phase"), d.get("step"), dict(d.get("weights") or {}),
                d.get("bundle") or d.get("candidate"), d.get("started_at"), d.get("ended_at"),
                d.get("reason"), win.get("requests"), win.get("errors"), win.get("oom_events"),
                win.get("nan_count"), server_now)


class DrillError(RuntimeError):
    """The drill could not run (server unreachable, admin call refused, bad option)."""


class Admin:
    """The few admin calls the drill makes (bearer token, JSON, errors as DrillError)."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 900.0):
        headers = {"x-slotserve-actor": "slotserve-drill"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s)

    async def call(self, method: str, path: str, body=None, timeout: float | None = None) -> dict:
        try:
            kw = {"timeout": timeout} if timeout is not None else {}
            r = await self.client.request(method, path, json=body, **kw)
        except httpx.HTTPError as exc:
            raise DrillError(f"cannot reach {self.client.base_url}: {type(exc).__name__}: {exc}") from None
        return admin_result(r, method, path, DrillError)

    async def poll(self) -> Poll:
        sent = time.time()
        d = await self.call("GET", "/admin/rollout", timeout=10.0)
        return _poll_from(sent, time.time(), d)

    async def aclose(self) -> None:
        await self.client.aclose()


async def monitor(admin: Admin, polls: list[Poll], stop: asyncio.Event, every_s: float = 0.05) -> None:
    """Poll the rollout status until `stop` is set (errors are skipped: the drill judges gaps)."""
    while not stop.is_set():
        try:
            polls.append(await admin.poll())
        except Exception:
            pass
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass
