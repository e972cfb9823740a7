"""Request handling without Ray: pick a slot, render the prompt, generate, answer.

The FastAPI routes (slotserve.app) parse the body into slotserve.protocol models and
call `Handler.chat / completion`; everything a request does after that lives here so
it can be tested with no Ray and no HTTP:

* which slot answers: the logical model name is routed by the rollout weights
  (slotserve.router.route, sticky by the spec's key); an exact `name:version` held in a
  slot is pinned to that slot; anything else is a 404 listing the served names;
* the prompt: the *answering* bundle's own chat template and system prompt
  (slotserve.bundle_view.BundleView), so a rollback restores the old prompting too;
* generation through a Backend (the slot manager), incremental detokenisation, stop
  strings, finish reasons and usage;
* a failure on a routed candidate before anything reached the client is counted
  against the candidate and the request is answered by live instead.

The first token is awaited before the HTTP response starts, so admission errors
(400), overload (429) and candidate failures become statuses or retries rather than a
broken stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Mapping, Protocol

from slotserve.bundle_view import BundleView, TextStream
from slotserve.protocol import (APIError, ChatChoice, ChatChunkChoice, ChatCompletion,
                                ChatCompletionChunk, Completion,
                                CompletionChoice, Delta, FeedbackRequest,
                                ResponseMessage, Usage, new_id, now)

DEFAULT_MAX_TOKENS = 256
SLOT_NAMES = ("live", "previous", "candidate")


# ---------------------------------------------------------------- what the handler needs from slots

class GenerationHandle(Protocol):
    finish_reason: str | None
    def __aiter__(self) -> AsyncIterator[int]: ...
    def cancel(self) -> None: ...


class Backend(Protocol):
    def views(self) -> dict[str, BundleView]: ...            # slot -> view, occupied slots only
    async def generate(self, slot: str, prompt_ids: list[int], params: dict) -> GenerationHandle: ...


@dataclass(frozen=True)
class Routing:
    """The part of the controller's desired state that routes requests on a replica."""

    weights: Mapping[str, float] = field(default_factory=lambda: {"live": 100.0})
    salt: str = ""
    sticky_key: str | None = None        # "header:x-session-id" | "user" | None
    served_name: str | None = None       # logical model name; None: the live bundle's name
    shadow_fraction: float = 0.0         # fraction of live requests mirrored to candidate


@dataclass
class Outcome:
    """One finished (or failed) generation, for windows, metrics and shadow diffs."""

    slot: str
    view: BundleView
    kind: str                        # "chat" | "completion" | "shadow"
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


# ---------------------------------------------------------------- one request

@dataclass
class Prepared:
    kind: str                 # "chat" | "completion"
    request: Any
    slot: str
    pinned: bool
    view: BundleView
    prompt_ids: list[int]
    params: dict
    retried_from: str | None = None   # name:version that failed before live answered


class Run:
    """A started generation: first token already in hand (or the request finished)."""

    def __init__(self, handler: "Handler", prep: Prepared, handle, stream: TextStream,
                 first: list[int], done: bool, t0: float, ttft: float | None):
        self.h, self.prep, self.handle, self.stream = handler, prep, handle, stream
        self.first, self.done, self.t0, self.ttft = first, done, t0, ttft
        self.id = handler.response_id(prep.view, "chatcmpl" if prep.kind == "chat" else "cmpl")
        self.created = now()
        self.finished = False
        self._recorded = False
        self.ended = asyncio.Event()     # set once the outcome is recorded (shadow diffs wait on it)
        self.error: BaseException | None = None

    def close(self) -> None:
        """Idempotent: cancel the engine request and record it if it never finished
        (the client went away before or while its response was sent)."""
        if not self._recorded:
            self.handle.cancel()
            self._record(False, None, True)

    def _record(self, ok: bool, err: BaseException | None, cancelled: bool) -> None:
        if not self._recorded:
            self._recorded = True
            self.error = err
            self.cancelled = cancelled
            self.h._observe_run(self, ok, err, cancelled)
            self.ended.set()

    @property
    def view(self) -> BundleView:
        return self.prep.view

    def headers(self) -> dict[str, str]:
        h = self.view.headers()
        if self.prep.retried_from:
            h["x-slotserve-retried-from"] = self.prep.retried_from
        return h

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces until the end; records the outcome; cancels the engine on exit."""
        ok, err, cancelled = False, None, False
        try:
            for t in self.first:
                if piece := self.stream.push(t):
                    yield piece
            if not self.done and not self.stream.stopped:
                async for t in self.handle:
                    if piece := self.stream.push(t):
                        yield piece
                    if self.stream.stopped:
                        break
            if piece := self.stream.flush():
                yield piece
            ok = True
        except asyncio.CancelledError:
            cancelled = True
            raise
        except GeneratorExit:
            cancelled = True
            raise
        except Exception as exc:
            err = exc
            raise
        finally:
            if self.stream.stopped or not ok:
                self.handle.cancel()  # frees the KV blocks of an abandoned request
            self.finished = ok
            self._record(ok, err, cancelled)

    @property
    def finish_reason(self) -> str:
        if self.stream.stopped:
            return "stop"
        reason = getattr(self.handle, "finish_reason", None)
        return "length" if reason == "length" else "stop"

    def usage(self) -> Usage:
        return Usage.of(len(self.prep.prompt_ids), len(self.stream.ids))

    # -- whole responses

    async def response(self) -> dict:
        text = "".join([p async for p in self.deltas()])
        v = self.view
        if self.prep.kind == "chat":
            body = ChatCompletion(id=self.id, created=self.created, model=v.ref,
                                  system_fingerprint=v.digest,
                                  choices=[ChatChoice(message=ResponseMessage(content=text),
                                                      finish_reason=self.finish_reason)],
                                  usage=self.usage())
        else:
            body = Completion(id=self.id, created=self.created, model=v.ref,
                              system_fingerprint=v.digest,
                              choices=[CompletionChoice(text=text, finish_reason=self.finish_reason)],
                              usage=self.usage())
        return body.model_dump(mode="json")

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`."""
        v, chat = self.view, self.prep.kind == "chat"
        include_usage = self.prep.request.include_usage

        def chunk(content: str | None, finish: str | None, role: bool = False,
                  usage: Usage | None = None, empty: bool = False) -> str:
            if chat:
                choices = [] if empty else [ChatChunkChoice(
                    delta=Delta(role="assistant" if role else None, content=content),
                    finish_reason=finish)]
                body = ChatCompletionChunk(id=self.id, created=self.created, model=v.ref,
                                           system_fingerprint=v.digest, choices=choices,
                                           usage=usage)
            else:
                choices = [] if empty else [CompletionChoice(text=content or "", finish_reason=finish)]
                body = Completion(id=self.id, created=self.created, model=v.ref,
                                  system_fingerprint=v.digest, choices=choices, usage=usage)
            data = body.model_dump(mode="json", exclude_none=False)
            if chat and not include_usage:
                data.pop("usage", None)
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

        if chat:
            yield chunk("", None, role=True)
        gen = self.deltas()
        try:
            async for piece in gen:
                yield chunk(piece, None)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # after the first token: report in-band, then end
            err = self.h.error_from(exc, self.prep)
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            await gen.aclose()  # closing here, not at GC, frees the engine request now
            self.close()
        yield chunk(None if chat else "", self.finish_reason)
        if include_usage:
            yield chunk(None, None, usage=self.usage(), empty=True)
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- the handler

class Handler:
    def __init__(self, backend: Backend, *, observe: Callable[[Outcome], None] | None = None,
                 on_shadow: Callable[[Any, BundleView], None] | None = None):
        self.backend = backend
        self.routing = Routing()
        self.observe = observe or (lambda outcome: None)
        self.on_shadow = on_shadow or (lambda diff, view: None)
        self.inflight = 0
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
        from slotserve.router import route
        return route(key, weights, self.routing.salt, request_id)

    def sticky_key(self, headers: Mapping[str, str], request) -> str | None:
        spec = self.routing.sticky_key
        if not spec or spec == "none":
            return None
        from slotserve.router import sticky_value
        body = request.model_dump() if spec.startswith("body:") else None
        return sticky_value(spec, headers, body)

    # -- preparing a request

    def prepare(self, kind: str, req, slot: str, pinned: bool) -> Prepared:
        views = self.backend.views()
        if slot not in views:
            raise APIError(503, f"slot {slot} is empty on this replica", code="not_ready")
        view = views[slot]
        if kind == "chat":
            ids = view.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            ids = view.encode(req.prompt)
        if not ids:
            raise APIError(400, "prompt is empty after tokenisation", param="prompt")
        ctx = view.max_model_len
        if len(ids) >= ctx:
            raise APIError(400, f"the prompt is {len(ids)} tokens but {view.ref}'s context is "
                                f"{ctx} tokens; shorten the prompt",
                           param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        limit = req.token_limit()
        if limit is not None and len(ids) + limit > ctx:
            raise APIError(400, f"max_tokens={limit} plus the prompt ({len(ids)} tokens) exceeds "
                                f"{view.ref}'s context of {ctx} tokens; ask for at most "
                                f"{ctx - len(ids)}", param="max_tokens",
                           code="context_length_exceeded")
        if limit is None:
            limit = min(int(view.sampling.get("max_tokens") or DEFAULT_MAX_TOKENS), ctx - len(ids))
        d = view.sampling
        params = {
            "temperature": _pick(req.temperature, d.get("temperature"), 1.0),
            "top_p": _pick(req.top_p, d.get("top_p"), 1.0),
            "top_k": _pick(req.top_k, d.get("top_k"), 0),
            "max_tokens": limit,
            "stop_token_ids": tuple(view.eos_ids),
            "seed": req.seed,
        }
        return Prepared(kind, req, slot, pinned, view, ids, params)

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
            from slotserve.router import shadow_mirror
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
        if actual is not None and getattr(actual, "digest", prep.view.digest) != prep.view.digest \
                and hasattr(self.backend, "view_of"):
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

    def _observe_run(self, run: Run, ok: bool, err: BaseException | None, cancelled: bool):
        self.inflight -= 1
        p = run.prep
        self._observe(Outcome(
            p.slot, p.view, p.kind, ok and not cancelled, time.perf_counter() - run.t0, run.ttft,
            len(p.prompt_ids), len(run.stream.ids), text=run.stream.text,
            token_ids=tuple(run.stream.ids), error=None if err is None else str(err),
            error_kind=None if err is None else type(err).__name__,
            greedy=p.params["temperature"] == 0, cancelled=cancelled))

    def _observe(self, outcome: Outcome):
        try:
            self.observe(outcome)
        except Exception:  # metrics must never fail a request
            pass

    def _spawn_shadow(self, kind: str, req, live_run: Run):
        """Mirror the request to the candidate in the background; never slows the client.
        When both have finished, their answers are compared (slotserve.shadow)."""
        if "candidate" not in self.backend.views():
            return

        async def shadow():
            from slotserve.shadow import compare
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

    def response_id(self, view: BundleView, prefix: str = "chatcmpl") -> str:
        # The answering bundle's digest rides in the id, so feedback reaching any
        # replica can be attributed without shared state.
        return new_id(prefix) + "-" + view.digest.split(":")[-1][:16]

    def feedback(self, req: FeedbackRequest) -> tuple[str | None, BundleView | None]:
        """(slot now holding the rated bundle or None, its view). 404 for an unknown id."""
        prefix = req.id.rsplit("-", 1)[-1] if "-" in req.id else ""
        if len(prefix) != 16 or any(c not in "0123456789abcdef" for c in prefix):
            raise APIError(404, f"unknown response id {req.id!r}: use the id of a response "
                                "this server returned", param="id", code="unknown_id")
        for slot, view in self.backend.views().items():
            if view.digest.split(":")[-1].startswith(prefix):
                return slot, view
        return None, None


class _Resume:
    """The engine handle, resumed after the first token was taken from its iterator."""

    def __init__(self, it, handle):
        self._it, self._h = it, handle

    def __aiter__(self):
        return self._it

    @property
    def finish_reason(self):
        return getattr(self._h, "finish_reason", None)

    def cancel(self):
        self._h.cancel()


def _pick(req_value, default, fallback):
    if req_value is not None:
        return req_value
    return default if default is not None else fallback


# Failures that say nothing about the bundle: do not retry them on live.
_NOT_THE_BUNDLES_FAULT: tuple[type[BaseException], ...] = (asyncio.CancelledError,)
