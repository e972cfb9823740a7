"""Constrained decoding on llguidance: per-tokenizer `TokenMasker`, per-sequence `Matcher`,
and masks applied to a step's logits. No API imports: a grammar arrives as llguidance's
grammar string (slotserve.api.structured builds it from a request).

    masker = TokenMasker(hf_tokenizer, eos_token_ids=(2,))             # once per tokenizer (~0.5-1 s)
    m = masker.matcher(grammar)                                        # per sequence (LRU-cached compile)
    bitmask = masker.allocate_bitmask(max_batch)                        # once per engine
    masker.mask_logits_(logits, [m or None per row], bitmask)           # each step, before sampling
    ok = m.consume(token_id)                                            # each token appended

Why not llguidance.torch: importing it costs ~3 s (it torch.compile-decorates its apply
kernel at import) and its kernel compiles again per shape class; the fill is llguidance's
Rust entry point called directly and the unpack is eager torch on the logits' device.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Sequence

import llguidance
import llguidance.hf
import torch

# The warm-up grammar: any JSON object (response_format json_object, the commonest one).
_ANY_OBJECT = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})


def unpack_bitmask(words: torch.Tensor, width: int, vocab_size: int) -> torch.Tensor:
    """int32 words [R, W] (bit j of word w = token 32*w + j) -> bool [R, width], False at and
    beyond `vocab_size` (the model's padded vocab rows have no token and are never allowed).
    Eager ops on the words' device: no torch.compile, no host sync."""
    r, w = words.shape
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).view(r, w * 32).bool()      # [R, 32W]
    n = min(width, vocab_size, w * 32)
    if n == width:
        return bits[:, :width]
    allowed = torch.zeros(r, width, dtype=torch.bool, device=words.device)
    allowed[:, :n] = bits[:, :n]
    return allowed


def _fill(executor: llguidance.LLExecutor | None, pairs: list[tuple[llguidance.LLMatcher, int]],
          bitmask: torch.Tensor) -> None:
    """llguidance writes each matcher's allowed tokens into row `i` of `bitmask` through a raw
    pointer, so the layout is checked first. (What llguidance.torch's fill helpers do; that
    module is not imported because importing it costs ~3 s: it torch.compile-decorates its
    apply kernel at import, which loads torch._dynamo.)"""
    assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.dim() == 2
    assert bitmask.is_contiguous(), "bitmask must be contiguous"
    rows, words = bitmask.shape
    assert all(0 <= i < rows for _, i in pairs), (rows, [i for _, i in pairs])
    if len(pairs) == 1 or executor is None:
        for m, i in pairs:
            row = bitmask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
    else:                                  # rows in parallel on llguidance's threads, GIL released
        executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, rows)


class Matcher:
    """One sequence's position in its grammar (a llguidance LLMatcher).

    Use from one thread at a time: llguidance raises RuntimeError("Already borrowed") when
    two threads touch the same matcher; different matchers may run on different threads.
    """

    __slots__ = ("_m", "vocab_size", "eos_token_ids", "_scratch")

    def __init__(self, ll_matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._scratch: torch.Tensor | None = None

    def fill(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 [N, ceil(V/32)], CPU)."""
        _fill(None, [(self._m, row)], bitmask)

    def allowed_mask(self, width: int | None = None) -> torch.Tensor:
        """bool [width] (default: the tokenizer's vocab): which tokens may come next."""
        if self._scratch is None:
            self._scratch = torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        self.fill(self._scratch)
        return unpack_bitmask(self._scratch, width or self.vocab_size, self.vocab_size)[0]

    def consume(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and `error` set) if the grammar forbids it."""
        return self._m.consume_token(int(token_id))

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (jump-forward candidates; not consumed)."""
        return self._m.compute_ff_tokens()

    def is_finished(self) -> bool:
        """The grammar is complete and cannot grow: the only token allowed next is EOS.
        (Also true in the error state; check `error`.)"""
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS allowed), though it may still grow."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        """The first line of llguidance's error (the rest dumps parser state), or None."""
        e = self._m.get_error()
        return e.splitlines()[0] if e else None

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last `num_tokens` consumed tokens (cheap; speculative decoding, stop strings)."""
        return self._m.rollback(num_tokens)

    def reset(self) -> bool:
        return self._m.reset()


@dataclass(frozen=True)
class MaskerTimings:
    tokenizer_s: float     # HF tokenizer -> llguidance tokenizer
    warmup_s: float        # first compile + first fill (any-JSON-object grammar)


class TokenMasker:
    """Everything constrained decoding needs for one tokenizer, built once (~0.4 s for SmolLM2).

    Holds the llguidance tokenizer, a thread pool for filling many rows at once, and an LRU
    of compiled grammars: a cached grammar is a pristine, warmed matcher that each new
    sequence deep-copies (~10-30 us; the copies share its lexer cache, so their first fill
    is ~0.04-0.15 ms instead of ~1.5 ms). Thread-safe: `matcher()` may be called from any thread.
    """

    def __init__(self, tokenizer, *, eos_token_ids: Sequence[int] = (), cache_size: int = 64,
                 threads: int | None = None):
        """`tokenizer`: a fast HF tokenizer. `eos_token_ids`: every id that ends a sequence for
        the engine (generation_config's list, not only the tokenizer's eos_token): a finished
        grammar allows exactly these. `threads`: llguidance's fill pool (None: its default)."""
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        t0 = time.perf_counter()
        eos = [int(e) for e in eos_token_ids] or None
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
        t1 = time.perf_counter()
        self.vocab_size: int = self.ll_tokenizer.vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(self.ll_tokenizer.eos_tokens)
        self.cache_size = cache_size
        self._executor = llguidance.LLExecutor(threads)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._pending: dict[str, Future] = {}      # grammars being compiled right now
        self.compiles = 0                          # grammars compiled (cache misses)
        # Warm-up: compile and fill json_object's grammar, the commonest one, so the first such
        # request pays nothing (~6 ms for SmolLM2's 49k vocab; the tokenizer conversion above
        # is the expensive part, ~0.4 s; see NOTES.md).
        self.matcher(_ANY_OBJECT).allowed_mask()
        self.timings = MaskerTimings(tokenizer_s=t1 - t0, warmup_s=time.perf_counter() - t1)

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)   # errors via get_error, not stderr
        if m.is_error():
            raise ValueError(f"grammar does not compile: {m.get_error().splitlines()[0]}")
        # One fill now builds the lexer states every copy of this grammar starts from.
        _fill(None, [(m, 0)], self.allocate_bitmask(1))
        return m

    def matcher(self, grammar: str) -> Matcher:
        """A fresh matcher for one sequence. Raises ValueError if the grammar does not compile.

        A grammar is compiled once even when many requests bring it at the same moment: the
        first compiles (outside the lock: llguidance drops the GIL, big schemas take
        10-1000 ms), the others wait for its result.
        """
        with self._lock:
            pristine = self._cache.get(grammar)
            if pristine is not None:
                self._cache.move_to_end(grammar)
                return Matcher(pristine.deep_copy(), self.vocab_size, self.eos_token_ids)
            pending = self._pending.get(grammar)
            owner = pending is None
            if owner:
                pending = self._pending[grammar] = Future()
        if owner:
            try:
                compiled = self._compile(grammar)
            except BaseException as e:
                with self._lock:
                    del self._pending[grammar]
                pending.set_exception(e)
                raise
            with self._lock:
                del self._pending[grammar]
                self.compiles += 1
                self._cache[grammar] = compiled
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            pending.set_result(compiled)
        else:
            try:
                compiled = pending.result()
            except ValueError as e:            # a fresh exception per waiting thread
                raise ValueError(str(e)) from None
        with self._lock:                       # deep_copy must not race a copy on another thread
            return Matcher(compiled.deep_copy(), self.vocab_size, self.eos_token_ids)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """int32 [rows, ceil(vocab/32)] on the CPU, for `mask_logits_`; allocate once per engine."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def mask_logits_(self, logits: torch.Tensor, matchers: Sequence[Matcher | None],
                     bitmask: torch.Tensor | None = None) -> None:
        """In place: every row with a matcher gets -inf where its grammar forbids the token,
        including the model's padded vocab beyond the tokenizer; rows with None are untouched.

        logits: [B, V] float on CPU or CUDA, V >= the tokenizer's vocab (model padding).
        matchers: B entries. bitmask: from `allocate_bitmask` with >= B rows (allocated if None).
        Several rows are filled in parallel on llguidance's threads, without the GIL.
        """
        assert logits.dim() == 2 and logits.shape[0] == len(matchers), (logits.shape, len(matchers))
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        b = len(matchers)
        if bitmask is None or bitmask.shape[0] < b:
            bitmask = self.allocate_bitmask(b)
        assert bitmask.shape[1] == (self.vocab_size + 31) // 32, "bitmask from another tokenizer"
        view = bitmask[:b]
        _fill(self._executor, [(matchers[i]._m, i) for i in rows], view)
        words = view[rows]                       # [R, W], a fresh CPU tensor (the buffer stays ours)
        allowed = unpack_bitmask(_to(words, logits.device), logits.shape[1], self.vocab_size)   # [R, V]
        if len(rows) == b:
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            idx = _to(torch.tensor(rows), logits.device)
            logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device` without a host sync: pinned through torch's caching
    host allocator, which keeps the block alive until the async copy has read it (so the
    caller may refill its bitmask at once; checked on an H200, see NOTES.md)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
