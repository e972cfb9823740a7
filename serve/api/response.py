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
        self.index = 0                   # the choice this run answers (n > 1: slotserve.api.choices)
        req = prep.request
        self.tools = None                # (names, ToolChoice) when the request offers tools
        if prep.kind == "chat" and getattr(req, "tools", None):
            from slotserve.api.tool_calls import callable_functions, functions, resolve_tool_choice
            choice = resolve_tool_choice(req.tools, req.tool_choice)
            if choice.mode != "none":
                self.tools = ({f.name for f in callable_functions(functions(req.tools), choice)}, choice)

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

    # -- logprobs (slotserve.engine.TokenLogprob per output token)

    def _token_text(self, tok: int) -> str:
        return self.view.tokenizer.decode([tok])

    def logprobs(self, start: int = 0, end: int | None = None, offset: int = 0) -> dict | None:
        """OpenAI's logprobs object for output tokens [start, end), or None when not asked;
        completions' `text_offset` counts from `offset` (where token `start` sits in `text`)."""
        if self.prep.params.get("logprobs") is None:
            return None
        entries = list(getattr(self.handle, "logprobs", []))[:len(self.stream.ids)][start:end]
        ids = self.stream.ids[start:start + len(entries)]
        if self.prep.kind == "chat":
            def item(tok, lp):
                t = self._token_text(tok)
                return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
            return {"content": [{**item(tok, e.logprob), "top_logprobs": [item(i, x) for i, x in e.top]}
                                for tok, e in zip(ids, entries)], "refusal": None}
        tokens = [self._token_text(t) for t in ids]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(i): x for i, x in e.top} for e in entries],
                "text_offset": offsets}

    def prompt_logprobs(self) -> dict | None:
        """Completions' logprobs object for the echoed prompt (echo with logprobs), offsets from
        0, or None when not asked. The first token's logprob and alternatives are null:
        nothing precedes it to predict it (OpenAI's and vLLM's shape)."""
        if self.prep.params.get("prompt_logprobs") is None:
            return None
        entries = [None, *getattr(self.handle, "prompt_logprobs", [])]
        ids = self.prep.prompt_ids
        assert len(entries) == len(ids), (len(entries), len(ids))   # complete before the first token
        tokens = [self._token_text(t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e and e.logprob for e in entries],
                "top_logprobs": [e and {self._token_text(i): x for i, x in e.top} for e in entries],
                "text_offset": offsets}

    def _echo(self) -> str:
        req = self.prep.request
        if self.prep.kind != "completion" or not req.echo:
            return ""
        return req.prompt if isinstance(req.prompt, str) else self.view.tokenizer.decode(self.prep.prompt_ids)

    # -- whole responses

    async def response(self) -> dict:
        """The whole answer (one choice, index `self.index`)."""
        text = "".join([p async for p in self.deltas()])
        v = self.view
        if self.prep.kind == "chat":
            body = ChatCompletion(id=self.id, created=self.created, model=v.ref,
                                  system_fingerprint=v.digest, choices=[self.chat_choice(text)],
                                  usage=self.usage())
        else:
            echo = self._echo()
            logprobs = self.logprobs(offset=len(echo))
            if prompt := self.prompt_logprobs():      # the echoed prompt's tokens, then the answer's
                logprobs = {k: prompt[k] + logprobs[k] for k in prompt}
            body = Completion(id=self.id, created=self.created, model=v.ref,
                              system_fingerprint=v.digest,
                              choices=[CompletionChoice(index=self.index, text=echo + text,
                                                        finish_reason=self.finish_reason,
                                                        logprobs=logprobs)],
                              usage=self.usage())
        return body.model_dump(mode="json")

    def chat_choice(self, text: str) -> ChatChoice:
        content, calls, finish = text, [], self.finish_reason
        if self.tools is not None:
            from slotserve.api.tool_calls import finish_reason, parse_tool_calls
            names, choice = self.tools
            content, calls = parse_tool_calls(text, names=names)
            finish = finish_reason(finish, calls, choice)
        message = ResponseMessage(content=content, tool_calls=[c.to_openai() for c in calls] or None)
        return ChatChoice(index=self.index, message=message, finish_reason=finish, logprobs=self.logprobs())

    async def sse(self, *, last: bool = True) -> AsyncIterator[str]:
        """Server-sent events: `data: {chunk}\n\n` ... `data: [DONE]\n\n` (with `last`; n > 1
        streams each choice in turn and ends once, slotserve.api.choices)."""
        v, chat = self.view, self.prep.kind == "chat"
        include_usage = self.prep.request.include_usage
        tool_stream = None
        if self.tools is not None:
            from slotserve.api.tool_calls import ToolCallStream, finish_reason
            tool_stream = ToolCallStream(names=self.tools[0])
        sent = 0                       # output tokens whose logprobs went out
        echo = "" if chat else self._echo()
        offset = len(echo)             # completions: where the next token's text sits in the whole text

        def pending_logprobs() -> dict | None:
            nonlocal sent, offset
            n = len(self.stream.ids)
            lp = self.logprobs(sent, n, offset) if n > sent else None
            sent = max(sent, n)
            if lp is not None and not chat:
                offset += sum(len(t) for t in lp["tokens"])
            return lp

        def chunk(content: str | None, finish: str | None, role: bool = False,
                  usage: Usage | None = None, empty: bool = False, tool_calls: list | None = None,
                  logprobs: dict | None = None) -> str:
            if chat:
                choices = [] if empty else [ChatChunkChoice(
                    index=self.index,
                    delta=Delta(role="assistant" if role else None, content=content, tool_calls=tool_calls),
                    finish_reason=finish, logprobs=logprobs)]
                body = ChatCompletionChunk(id=self.id, created=self.created, model=v.ref,
                                           system_fingerprint=v.digest, choices=choices,
                                           usage=usage)
            else:
                choices = [] if empty else [CompletionChoice(index=self.index, text=content or "",
                                                             finish_reason=finish, logprobs=logprobs)]
                body = Completion(id=self.id, created=self.created, model=v.ref,
                                  system_fingerprint=v.digest, choices=choices, usage=usage)
            data = body.model_dump(mode="json", exclude_none=False)
            if chat and not include_usage:
                data.pop("usage", None)
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

        def pieces(deltas: list[dict]):
            for i, d in enumerate(deltas):
                lp = pending_logprobs() if i == len(deltas) - 1 else None
                yield chunk(d.get("content"), None, tool_calls=d.get("tool_calls"), logprobs=lp)

        if chat:
            yield chunk("", None, role=True)
        elif echo:   # the prompt first, with its logprobs when asked (vLLM streams it so too)
            yield chunk(echo, None, logprobs=self.prompt_logprobs())
        gen = self.deltas()
        try:
            async for piece in gen:
                if tool_stream is not None:
                    for c in pieces(tool_stream.push(piece)):
                        yield c
                else:
                    yield chunk(piece, None, logprobs=pending_logprobs())
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
        finish = self.finish_reason
        if tool_stream is not None:
            for c in pieces(tool_stream.finish()):
                yield c
            finish = finish_reason(finish, tool_stream.calls, self.tools[1])
        yield chunk(None if chat else "", finish, logprobs=pending_logprobs())
        if include_usage and last:
            yield chunk(None, None, usage=self.usage(), empty=True)
        if last:
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

    @property
    def logprobs(self) -> list:
        return getattr(self._h, "logprobs", [])

    @property
    def prompt_logprobs(self) -> list:
        return getattr(self._h, "prompt_logprobs", [])

    def cancel(self):
        self._h.cancel()
