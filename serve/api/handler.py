"""Request handling without Ray or HTTP: pick a slot, render the prompt, generate, answer.

The FastAPI routes (slotserve.api.routes) parse the body into the request models
(slotserve.api.requests) and call `Handler.start`; everything a request does after that
lives here so it can be tested with no Ray and no HTTP:

* which slot answers: the logical model name is routed by the replica's `Routing` (the
  rollout weights; slotserve.rollout.router.route, sticky by the spec's key); an exact
  `name:version` held in a slot is pinned to that slot; anything else is a 404 listing
  the served names;
* the prompt: the *answering* bundle's own chat template and system prompt
  (slotserve.replica.bundle_view.BundleView), so a rollback restores the old prompting too;
* generation through a Backend (the replica's slots), incremental detokenisation, stop
  strings, finish reasons and usage;
* a failure on a routed candidate before anything reached the client is counted
  against the candidate and the request is answered by live instead.

The first token is awaited before the HTTP response starts, so admission errors
(400), overload (429) and candidate failures become statuses or retries rather than a
broken stream.

Preparing a request (prompt rendering, context checks, sampling parameters) lives in
slotserve.api.preparation; the started generation and the response or SSE stream built
from it (`Run`) in slotserve.api.response. A replica's eval gate runs its items through
`answer`, the same path without a client.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Mapping, Protocol

from slotserve import SLOT_NAMES
from slotserve.api.errors import APIError
from slotserve.api.preparation import Prepared, prepare
from slotserve.api.requests import ChatCompletionRequest, CompletionRequest, FeedbackRequest
from slotserve.api.response import Run, _Resume
from slotserve.api.response_ids import ResponseIds
from slotserve.api.text_stream import TextStream
from slotserve.replica import BundleView, Outcome, Routing
from slotserve.rollout.feedback import RatedOnce


# ---------------------------------------------------------------- what the handler needs from slots

class GenerationHandle(Protocol):
    """A started generation. A slot manager's handle also has `slot`: the Slot answering
    now (live, when a candidate ran out of memory and the request was retried)."""
    finish_reason: str | None
    def __aiter__(self) -> AsyncIterator[int]: ...
    def cancel(self) -> None: ...


class Backend(Protocol):
    def views(self) -> dict[str, BundleView]: ...            # slot -> view, occupied slots only
    def view_of(self, slot) -> BundleView: ...               # the view of the Slot a handle ran on
    async def generate(self, slot: str, prompt_ids: list[int], params: dict) -> GenerationHandle: ...


LATENCY_EWMA = 0.1        # weight of the newest finished request in the mean latency
RETRY_AFTER_MAX_S = 60


def retry_after_s(inflight: int, capacity: int, latency_s: float) -> int:
    """Seconds a refused client should wait (the 429's Retry-After): the `inflight`
    requests ahead drain `capacity` at a time, each taking about `latency_s`; at least 1,
    at most RETRY_AFTER_MAX_S."""
    rounds = max(inflight, 1) / max(capacity, 1)
    return int(min(RETRY_AFTER_MAX_S, max(1, math.ceil(rounds * max(latency_s, 0.0)))))


# ---------------------------------------------------------------- the handler

class Handler:
    def __init__(self, backend: Backend, *, observe: Callable[[Outcome], None] | None = None,
                 on_shadow: Callable[[Any, BundleView], None] | None = None, ids: ResponseIds | None = None):
        self.backend = backend
        self.ids = ids or ResponseIds()       # replicas of one app share the signing key
        self.rated = RatedOnce()
        self.routing = Routing()
        self.observe = observe or (lambda outcome: None)
        self.on_shadow = on_shadow or (lambda diff, view: None)
        self.inflight = 0
        self.latency_s = 1.0                  # mean of finished requests (EWMA): sizes Retry-After
        self._shadow_tasks: set[asyncio.Task] = set()

    # -- names and routing

    def served_name(self, views: Mapping[str, BundleView] | None = None) -> str | None:
        views = self.backend.views() if views is None else views
        if self.routing.served_name:
            return self.routing.served_name
        live = views.get("live")
        return live.name if live else None

    def served_names(self) -> list[str]:
        views = self.backend.views()
        names = [n] if (n := self.served_name(views)) else []
        return names + [views[s].ref for s in SLOT_NAMES if s in views]

    def resolve(self, model: str, key: str | None) -> tuple[str, bool]:
        """(slot, pinned) for a request naming `model`."""
        views = self.backend.views()
        if model == self.served_name(views):
            return self.route(key, views), False
        for slot in SLOT_NAMES:
            if slot in views and views[slot].ref == model:
                return slot, True
        names = self.served_names()
        raise APIError(404, f"model {model!r} is not served here; served models: "
                            f"{', '.join(names) if names else 'none (nothing loaded yet)'}",
                       param="model", code="model_not_found")

    def route(self, key: str | None, views: Mapping[str, BundleView], request_id: str | None = None) -> str:
        weights = {s: w for s, w in self.routing.weights.items() if w > 0 and s in views}
        if not weights:
            if "live" in views:
                return "live"
            raise APIError(503, "no bundle is loaded yet", code="not_ready")
        if len(weights) == 1:
            return next(iter(weights))
        from slotserve.rollout.router import route
        return route(key, weights, self.routing.salt, request_id)

    def sticky_key(self, headers: Mapping[str, str], request) -> str | None:
        spec = self.routing.sticky_key
        if not spec or spec == "none":
            return None
        from slotserve.rollout.router import sticky_value
        body = request.model_dump() if spec.startswith("body:") else None
        return sticky_value(spec, headers, body)

    # -- preparing a request

    def prepare(self, kind: str, req, slot: str, pinned: bool) -> Prepared:
        return prepare(self.backend.views(), kind, req, slot, pinned)

    # -- running

    async def start(self, kind: str, req, headers: Mapping[str, str]) -> Run:
        key = self.sticky_key(headers, req)
        slot, pinned = self.resolve(req.model, key)
        if not pinned and slot not in self.backend.views():
            slot = "live"  # swapped away between routing and now (promote/revert)
        prep = self.prepare(kind, req, slot, pinned)
        try:
            run = await self._start(prep)
        except APIError:
            raise
        except Exception as exc:
            if pinned or slot == "live" or isinstance(exc, _NOT_THE_BUNDLES_FAULT):
                raise self.error_from(exc, prep) from None
            # The candidate (or previous) failed before the client saw anything: count
            # it against that slot, answer from live.
            failed = prep.view.ref
            prep = self.prepare(kind, req, "live", False)
            prep.retried_from = failed
            try:
                run = await self._start(prep)
            except APIError:
                raise
            except Exception as exc2:
                raise self.error_from(exc2, prep) from None
        if not pinned and prep.slot == "live" and self.routing.shadow_fraction > 0:
            from slotserve.rollout.router import shadow_mirror
            if shadow_mirror(key, self.routing.shadow_fraction, self.routing.salt, run.id):
                self._spawn_shadow(kind, req, run)
        return run

    async def _start(self, prep: Prepared) -> Run:
        t0 = time.perf_counter()
        self.inflight += 1
        handle = None
        try:
            handle = await self.backend.generate(prep.slot, prep.prompt_ids, prep.params)
            it = handle.__aiter__()
            try:
                first = [await it.__anext__()]
                done = False
            except StopAsyncIteration:
                first, done = [], True
        except BaseException as exc:
            self.inflight -= 1
            if handle is not None:
                handle.cancel()
            if not isinstance(exc, asyncio.CancelledError):
                self._observe(Outcome(prep.slot, prep.view, prep.kind, False,
                                      time.perf_counter() - t0, None, len(prep.prompt_ids), 0,
                                      error=str(exc), error_kind=type(exc).__name__))
            raise
        actual = getattr(handle, "slot", None)  # the slot manager retried elsewhere (candidate OOM)
        if actual is not None and actual.digest != prep.view.digest:
            self._observe(Outcome(prep.slot, prep.view, prep.kind, False, time.perf_counter() - t0,
                                  None, len(prep.prompt_ids), 0,
                                  error=f"out of memory on {prep.view.ref}; answered by {actual.name}",
                                  error_kind="OutOfMemoryError"))
            prep = replace(prep, slot=actual.name, view=self.backend.view_of(actual),
                           retried_from=prep.view.ref)
        stream = TextStream(prep.view.tokenizer, prep.request.stop_list())
        run = Run(self, prep, _Resume(it, handle), stream, first, done, t0,
                  time.perf_counter() - t0)
        return run

    async def answer(self, slot: str, prompt, max_tokens: int) -> str:
        """The greedy text of `prompt` (a string, or chat messages) from the bundle in `slot`,
        through a request's path (prompt rendering, stop strings), with no client: the
        eval gate's items. Marked "eval", so no metric window counts it."""
        view = self.backend.views()[slot]
        if isinstance(prompt, str):
            req = CompletionRequest(model=view.ref, prompt=prompt, max_tokens=max_tokens, temperature=0)
            kind = "completion"
        else:
            req = ChatCompletionRequest(model=view.ref, messages=prompt, temperature=0, max_tokens=max_tokens)
            kind = "chat"
        prep = self.prepare(kind, req, slot, True)
        prep.kind = "eval"
        run = await self._start(prep)
        return "".join([p async for p in run.deltas()])

    def run_ended(self, run: Run, ok: bool, err: BaseException | None, cancelled: bool):
        """A started generation ended (`Run` calls this once): it leaves the in-flight count
        and its outcome is observed."""
        self.inflight -= 1
        p = run.prep
        self._observe(Outcome(
            p.slot, p.view, p.kind, ok and not cancelled, time.perf_counter() - run.t0, run.ttft,
            len(p.prompt_ids), len(run.stream.ids), text=run.stream.text,
            token_ids=tuple(run.stream.ids), error=None if err is None else str(err),
            error_kind=None if err is None else type(err).__name__,
            greedy=p.params["temperature"] == 0, cancelled=cancelled))

    def _observe(self, outcome: Outcome):
        if outcome.ok and outcome.kind in ("chat", "completion"):
            self.latency_s += LATENCY_EWMA * (outcome.latency_s - self.latency_s)
        try:
            self.observe(outcome)
        except Exception:  # metrics must never fail a request
            pass

    def _spawn_shadow(self, kind: str, req, live_run: Run):
        """Mirror the request to the candidate in the background; never slows the client.
        When both have finished, their answers are compared (slotserve.rollout.shadow)."""
        if "candidate" not in self.backend.views():
            return

        async def shadow():
            from slotserve.rollout.shadow import compare
            words, err, view = None, False, None
            try:
                prep = self.prepare(kind, req, "candidate", False)
                view = prep.view
                run = await self._start(prep)
                run.prep.kind = "shadow"
                async for _ in run.deltas():
                    pass
                words = run.stream.text.split()
            except Exception:
                err = True
            if view is None:
                return
            try:
                await asyncio.wait_for(live_run.ended.wait(), 600)
            except asyncio.TimeoutError:
                return
            if getattr(live_run, "cancelled", False):
                return  # the client left: nothing to compare
            live_ok = live_run.finished
            # Words, not token ids: the candidate may change the tokenizer.
            diff = compare(live_run.stream.text.split() if live_ok else None, words,
                           greedy=live_run.prep.params["temperature"] == 0,
                           live_error=not live_ok, shadow_error=err)
            try:
                self.on_shadow(diff, view)
            except Exception:
                pass

        task = asyncio.get_running_loop().create_task(shadow())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    def error_from(self, exc: BaseException, prep: Prepared | None) -> APIError:
        if isinstance(exc, APIError):
            return exc
        name = type(exc).__name__
        where = prep.view.ref if prep else "the server"
        if name == "AdmissionError":
            return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
        if name == "Overloaded" or isinstance(exc, asyncio.QueueFull):
            retry = str(max(1, int(round(getattr(exc, "retry_after", 1) or 1))))
            return APIError(429, f"server overloaded: {exc}; retry after {retry}s",
                            code="overloaded", headers={"Retry-After": retry})
        if isinstance(exc, (ValueError, TypeError)) and name not in ("InjectedError",):
            return APIError(400, f"{where} refused the request: {exc}")
        return APIError(500, f"generation failed on {where}: {name}: {exc}", code="generation_failed")

    # -- feedback

    def response_id(self, view: BundleView, slot: str, prefix: str = "chatcmpl") -> str:
        # Signed, and naming the answering bundle and slot, so feedback reaching any
        # replica can be checked and attributed without shared state.
        return self.ids.issue(prefix, view.digest, slot)

    def feedback(self, req: FeedbackRequest) -> tuple[str | None, BundleView | None]:
        """(slot now holding the rated bundle or None, its view).

        404 for an id this app did not issue, 409 for one already rated: a thumbs-down
        rate may roll a rollout back, so forged or repeated ratings must not count.
        """
        found = self.ids.check(req.id)
        if found is None:
            raise APIError(404, f"unknown response id {req.id!r}: use the id of a response "
                                "this server returned", param="id", code="unknown_id")
        if not self.rated.first(req.id):
            raise APIError(409, f"response {req.id!r} was already rated; each response counts once",
                           param="id", code="already_rated")
        digest, answered_from = found
        views = self.backend.views()
        holds = [s for s, v in views.items() if v.digest.split(":")[-1].startswith(digest)]
        if not holds:
            return None, None
        # the slot that answered while it still holds that bundle (one bundle may sit in
        # two slots), else wherever the bundle is now (e.g. live after a promote)
        slot = answered_from if answered_from in holds else holds[0]
        return slot, views[slot]


# Failures that say nothing about the bundle: do not retry them on live.
_NOT_THE_BUNDLES_FAULT: tuple[type[BaseException], ...] = (asyncio.CancelledError,)
