"""What a caller hands the engine and gets back: `SamplingParams`, the `RequestHandle`
(tokens as they are sampled, sync or async; cancel; the outcome) and the engine's errors.

Tokens reach a handle from the engine's step thread; async consumers are woken on their
own event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slotserve.engine.scheduler import Sequence

if TYPE_CHECKING:
    from slotserve.engine.engine import Engine

FINISH_REASONS = ("stop", "length", "cancelled", "error")
MAX_LOGPROBS = 20                      # top alternatives per token, OpenAI's limit


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a sampled token (raw logits: before bias, penalties,
    grammar mask and temperature) and its `top` alternatives [(id, logprob)], most likely first."""
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class AdmissionError(ValueError):
    """A request the engine can never serve (too long for the context or the KV pool)."""


class EngineClosedError(RuntimeError):
    """The engine was closed while the request was queued or running."""


class EngineParkedError(RuntimeError):
    """The engine's weights are parked in host memory; `unpark()` it to serve again."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0                 # 1.0 = off
    top_k: int = 0                     # 0 = off
    max_tokens: int = 16               # 0: prefill only (score the prompt with prompt_logprobs), nothing sampled
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None            # None = a fresh random seed per request
    ignore_eos: bool = False           # benchmarks: generate exactly max_tokens unless a stop id
    # Logits processing before the sampler (slotserve.kernels.apply_penalties; docs/engine.md):
    presence_penalty: float = 0.0      # OpenAI, [-2, 2]; 0 = off
    frequency_penalty: float = 0.0     # OpenAI, [-2, 2]; 0 = off
    repetition_penalty: float = 1.0    # HF / vLLM, > 0; 1 = off
    min_p: float = 0.0                 # [0, 1]; 0 = off (and off for greedy)
    logit_bias: tuple[tuple[int, float], ...] = ()    # (token id, added to its logit)
    logprobs: int | None = None        # None = off; else top alternatives per token (0..20)
    # None = off; else each prompt token after the first gets its logprob and this many top
    # alternatives (0..20), from logits at every prompt position (completions' echo + logprobs)
    prompt_logprobs: int | None = None
    grammar: str | None = None         # llguidance grammar the output must match (slotserve.engine.constraints)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0: prefill only, nothing generated), got {self.max_tokens}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in self.logit_bias))

    @property
    def penalized(self) -> bool:
        """Needs the sequence's token counts (a token_state row)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class RequestHandle:
    """A submitted request: iterate its tokens (async or sync), cancel it, read the outcome."""

    def __init__(self, engine: "Engine", request_id: int, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []    # one per output token when params.logprobs is set
        # one per prompt token after the first (nothing scores the first) when
        # params.prompt_logprobs is set; complete before the first output token arrives
        self.prompt_logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._seq: Sequence | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # --- engine side (called with the engine lock held) --------------------------------
    def _push(self, token: int | None, finish_reason: str | None = None, error: BaseException | None = None,
              logprob: TokenLogprob | None = None):
        with self._cond:
            if self.finish_reason is not None:
                return
            now = time.perf_counter()
            if token is not None:
                if logprob is not None:
                    self.logprobs.append(logprob)   # before the token: a reader of token i finds its logprob
                self.output_ids.append(token)
                if self.first_token_at is None:
                    self.first_token_at = now
            if finish_reason is not None:
                self.finish_reason, self.error, self.finished_at = finish_reason, error, now
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the consumer's loop is closed; nobody is listening
                pass

    def _push_prompt(self, logprobs: list[TokenLogprob]) -> None:
        """The next prompt tokens' logprobs (one prefill chunk's; engine lock held)."""
        with self._cond:
            self.prompt_logprobs.extend(logprobs)

    # --- consumer side ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache when the request was first scheduled."""
        seq = self._seq
        return (seq.cached_prompt_tokens or 0) if seq is not None else 0

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first token."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    def cancel(self) -> None:
        """Stop generating and free the request's KV blocks now (no-op once finished)."""
        self._engine._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.finish_reason is not None, timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until finished; the output ids, or raise the request's error."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self.error is not None:
            raise self.error
        return list(self.output_ids)

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Synchronous token iterator (for threads); raises the request's error at the end."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: i < len(self.output_ids) or self.finish_reason is not None,
                                           timeout):
                    raise TimeoutError(f"no token from request {self.request_id} in {timeout}s")
                if i < len(self.output_ids):
                    tok = self.output_ids[i]
                elif self.error is not None:
                    raise self.error
                else:
                    return
            i += 1
            yield tok

    def __aiter__(self) -> AsyncIterator[int]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[int]:
        i = 0
        while True:
            with self._cond:
                if i < len(self.output_ids):
                    tok = self.output_ids[i]
                    fut = None
                elif self.finish_reason is not None:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    loop = asyncio.get_running_loop()
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is None:
                i += 1
                yield tok
            else:
                await fut

    def __repr__(self) -> str:
        return (f"RequestHandle(id={self.request_id}, tokens={len(self.output_ids)}, "
                f"finish_reason={self.finish_reason!r})")


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
