"""A started generation and the response built from it.

`Run` holds a request whose first token is already in hand (so admission errors,
overload and candidate failures became statuses or retries, not a broken stream); it
streams the rest through the bundle's incremental detokeniser (stop strings), records
the outcome exactly once, and builds the OpenAI-shaped answer: a whole body
(`response()`) or server-sent events (`sse()`).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, AsyncIterator

from slotserve.api.preparation import Prepared
from slotserve.api.responses import (ChatChoice, ChatChunkChoice, ChatCompletion,
                                ChatCompletionChunk, Completion, CompletionChoice, Delta,
                                ResponseMessage, Usage, now)
from slotserve.api.text_stream import TextStream
from slotserve.replica.bundle_view import BundleView

if TYPE_CHECKING:
    from slotserve.api.handler import Handler


class Run:
    """A started generation: first token already in hand (or the request finished)."""

    def __init__(self, handler: "Handler", prep: Prepared, handle, stream: TextStream,
                 first: list[int], done: bool, t0: float, ttft: float | None):
        self.h, self.prep, self.handle, self.stream = handler, prep, handle, stream
        self.first, self.done, self.t0, self.ttft = first, done, t0, ttft
        self.id = handler.response_id(prep.view, prep.slot, "chatcmpl" if prep.kind == "chat" else "cmpl")
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
            self.h.run_ended(self, ok, err, cancelled)
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
        return Usage.of(len(self.prep.prompt_ids), len(self.stream.ids), getattr(self.handle, "cached_tokens", 0))

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


class _Resume:
    """The engine handle, resumed after the first token was taken from its iterator."""

    def __init__(self, it, handle):
        self._it, self._h = it, handle

    def __aiter__(self):
        return self._it

    @property
    def finish_reason(self):
        return getattr(self._h, "finish_reason", None)

    @property
    def cached_tokens(self) -> int:
        return getattr(self._h, "cached_tokens", 0)

    def cancel(self):
        self._h.cancel()
