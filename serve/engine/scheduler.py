"""Continuous batching: which sequences run in the next step, and what happens after it.

One step carries a decode row (one token) for every running sequence whose prompt is
done, plus prefill chunks of other sequences' prompts, at most `max_prefill_tokens`
prompt tokens per step (long prompts are split over several steps). So a new long
prompt never stalls running streams for more than one capped step, and on hardware
where large matmuls are cheaper per row (CPU, and GPU prefill) decode rows ride along.

Memory rules (the pool is `BlockAllocator`):
- admission is FIFO and reserves the blocks for the whole (remaining) prompt, so a
  sequence whose prefill started never waits for blocks;
- with prefix caching (prefix_cache.py) admission first takes the longest run of
  cached full blocks of the prompt (shared, reference-counted) and starts the sequence
  after them; only the rest is allocated and prefilled. Blocks are registered for reuse
  in `postprocess`, i.e. only after the step that computed them succeeded;
- a decode step that needs a new block and finds none *preempts by recompute*: the most
  recently admitted sequence frees its blocks and goes back to the front of the queue
  (its prompt + output so far is prefilled again later);
- the engine refuses up front any request that could not fit the pool alone, so the
  queue always drains.

Prompt scoring (`Sequence.score_prompt`, completions' echo + logprobs): the engine needs
the logits at every prompt position, not only the last. The batch lists those positions
(`Batch.scoring`), and `prompt_scored` remembers how far a sequence got, so a prefix-cache
hit is cut to the blocks already scored (vLLM skips the hit for such requests; here a
preempted sequence that re-prefills its scored prompt still reuses it), and a sequence
still scoring prefills at most MAX_SCORED_TOKENS per step: the logits of every scored
position are materialised ([n, V] fp32), so this bounds their memory.

This file owns no tensors and no threads; the engine holds the lock around every call.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from slotserve.engine.kv_cache import BlockAllocator, blocks_for
from slotserve.engine.prefix_cache import PrefixCache

# Prompt positions a scoring sequence prefills per step: their logits are [n, V] fp32, about
# 260 MB at n = 512 for a 128k vocabulary (and as much again for their log-softmax).
MAX_SCORED_TOKENS = 512


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's mutable state inside the engine (tokens, blocks, progress)."""

    seq_id: int
    prompt_len: int
    token_ids: list[int]              # prompt + output so far
    max_tokens: int
    stop_ids: frozenset[int]
    seed: int
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0               # tokens whose K/V are in the pool
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    handle: object = None             # the engine's RequestHandle (opaque here)
    block_keys: list[bytes] = field(default_factory=list)   # prefix-cache keys of full blocks, computed once
    num_registered: int = 0           # leading blocks of block_table already in the prefix cache (or refused)
    cached_prompt_tokens: int | None = None   # prompt tokens its first admission took from the prefix cache
    adapter: int = -1                 # slot in the model's LoraTable (-1: the base model)
    prefix_root: bytes | None = None  # prefix-cache key root: scoped to the adapter (prefix_cache.adapter_root)
    params: object = None             # the engine's SamplingParams (opaque here)
    matcher: object = None            # grammar state (slotserve.engine.constraints.Matcher) or None
    state_row: int = -1               # the engine's token_state row (penalties), -1: none
    state_fresh: bool = False         # state_row assigned but not built yet (the next step builds it)
    error: BaseException | None = None   # why postprocess finished it with "error"
    score_prompt: bool = False        # the engine needs the logits of every prompt position
    prompt_scored: int = 0            # prompt positions whose logits were computed (they score tokens 1..n)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def running(self) -> bool:
        return self.status is SeqStatus.RUNNING

    @property
    def in_decode(self) -> bool:
        """Everything but the last sampled token is cached: ready for a decode step."""
        return self.num_cached == len(self.token_ids) - 1


@dataclass
class Batch:
    """One model step: for each sequence the token range [start, end) to compute.

    The first `num_decode` rows are decode rows (one token: start = num_cached); the rest
    are prefill chunks. A row samples a token when its range reaches the end of the
    sequence (`samples[i]`): every decode row, and a prefill chunk that ends its prompt
    (unless the sequence asks for no output at all: max_tokens 0).
    """

    seqs: list[Sequence]
    starts: list[int]
    ends: list[int]
    num_decode: int = 0
    # Each row's block table as scheduled. The runner builds the step's inputs from these
    # (and starts/ends) outside the engine lock, while a cancel may release a sequence:
    # that empties its live `block_table` and zeroes `num_cached` (the step still writes
    # into the released blocks, harmlessly: nothing can reuse them before the next schedule).
    tables: list[list[int]] = field(default_factory=list)
    # (row, lo, hi): positions [lo, hi) of row's chunk whose logits score the prompt (the
    # token at p + 1 for position p); empty unless a sequence scores its prompt
    scoring: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.num_decode == len(self.seqs):
            return "decode"
        return "prefill" if self.num_decode == 0 else "mixed"

    @property
    def samples(self) -> list[bool]:
        return [e == len(s) and s.max_tokens > 0 for s, e in zip(self.seqs, self.ends)]

    @property
    def num_tokens(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_batch: int,
        max_model_len: int,
        max_prefill_tokens: int,
        on_release: Callable[[Sequence], None] | None = None,
        spread_blocks: bool = False,
        prefix_caching: bool = False,
    ):
        assert max_batch >= 1 and max_prefill_tokens >= 1
        self.alloc = allocator
        self.block_size = allocator.block_size
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.on_release = on_release or (lambda seq: None)
        self.spread_blocks = spread_blocks   # CPU: keep each sequence's blocks consecutive
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # admission order
        self.num_preemptions = 0
        # Off on the transformers fallback: its runner keeps a private cache per sequence.
        self.prefix = PrefixCache(allocator) if prefix_caching else None
        self.prompt_tokens = 0            # tokens admitted for prefill (a re-admitted preempted sequence again)
        self.cached_prompt_tokens = 0     # ... of which prefix-cache hits served

    # --- queue -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Drop a sequence wherever it is and free its blocks now (stop, cancel, error)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        else:
            self.running.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.alloc.free(seq.block_table)
        seq.num_cached = seq.num_registered = 0
        self.on_release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def clear_prefix_cache(self) -> None:
        """Forget every cached block (the KV pool is being dropped); needs an idle engine."""
        assert not self.running, "clearing the prefix cache under running sequences"
        if self.prefix is not None:
            self.prefix.clear()

    # --- scheduling ----------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Every decode-ready sequence gets a row, then prefill chunks fill `max_prefill_tokens`.

        Mixing them in one step (as vLLM and Sarathi-Serve do) keeps running streams moving
        while prompts are prefilled, and lets decode rows ride on the prefill's large matmuls.
        """
        seqs, starts, ends = [], [], []
        self._schedule_decode(seqs, starts, ends)
        num_decode = len(seqs)
        self._schedule_prefill(seqs, starts, ends)
        if not seqs:
            return None
        scoring = [(i, max(starts[i], s.prompt_scored), min(ends[i], s.prompt_len - 1))
                   for i, s in enumerate(seqs) if i >= num_decode and s.score_prompt]
        return Batch(seqs, starts, ends, num_decode, [list(s.block_table) for s in seqs],
                     [r for r in scoring if r[1] < r[2]])

    def _schedule_decode(self, seqs, starts, ends) -> None:
        todo = deque(self.running)
        while todo:
            seq = todo.popleft()
            if not seq.in_decode:
                continue
            if seq.num_cached == len(seq.block_table) * self.block_size:   # needs a new block
                while not self.alloc.can_allocate(1):
                    # Preempt the newest sequence not yet scheduled; if none is left, this one.
                    victim = todo.pop() if todo else seq
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
                seq.block_table.append(self.alloc.allocate_after(seq.block_table[-1] if seq.block_table else None))
            seqs.append(seq), starts.append(seq.num_cached), ends.append(seq.num_cached + 1)

    def _schedule_prefill(self, seqs, starts, ends) -> None:
        budget = self.max_prefill_tokens
        # 1) sequences admitted earlier whose prompt is still being prefilled (chunked)
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_cached < len(seq) - 1:  # (== len-1 is a decode row)
                n = min(len(seq) - seq.num_cached, budget, self._chunk_cap(seq))
                seqs.append(seq), starts.append(seq.num_cached), ends.append(seq.num_cached + n)
                budget -= n
        # 2) admit from the queue, strictly FIFO (no overtaking), reserving whole prompts
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_cached, budget, self._chunk_cap(seq))
            seqs.append(seq), starts.append(seq.num_cached), ends.append(seq.num_cached + n)
            budget -= n

    @staticmethod
    def _chunk_cap(seq: Sequence) -> int:
        """The most tokens of `seq` one step may prefill (bounded while it scores its prompt)."""
        return MAX_SCORED_TOKENS if seq.score_prompt and seq.prompt_scored < seq.prompt_len - 1 else len(seq)

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` the blocks of its whole prompt (cached prefix shared, the rest fresh) or
        return False when the pool cannot hold them now."""
        hit = self.prefix.match(seq) if self.prefix is not None else []
        if seq.score_prompt:   # a hit skips computing its positions: only the scored ones may hit
            hit = hit[:seq.prompt_scored // self.block_size]
        need = blocks_for(len(seq), self.block_size) - len(hit)
        # A hit block nobody holds is in the free pool: sharing it uses up a free block too.
        if not self.alloc.can_allocate(need + (self.prefix.reclaimed(hit) if hit else 0)):
            return False
        if hit:
            self.prefix.share(hit)   # before allocating: a fresh allocation must not evict them
        if self.spread_blocks:
            # In a pool full of cache the allocator also hands out the blocks the remaining
            # output may need (at most 8), so the sequence grows into consecutive blocks
            # (see BlockAllocator.allocate_spread); decode uses them before asking for more.
            final = min(seq.prompt_len + seq.max_tokens - 1, self.max_model_len - 1)   # tokens ever stored
            room = min(max(blocks_for(final, self.block_size) - blocks_for(len(seq), self.block_size), 0), 8)
            fresh = self.alloc.allocate_spread(need, room)
        else:
            fresh = self.alloc.allocate(need)
        seq.block_table = hit + fresh
        seq.num_cached, seq.num_registered = len(hit) * self.block_size, len(hit)
        self.prompt_tokens += len(seq)
        self.cached_prompt_tokens += seq.num_cached
        if seq.cached_prompt_tokens is None:   # what the client is told (usage.prompt_tokens_details)
            seq.cached_prompt_tokens = seq.num_cached
        return True

    # --- after the step ----------------------------------------------------------------------
    def postprocess(self, batch: Batch, sampled: dict[int, int]) -> list[tuple[Sequence, int | None]]:
        """Advance each row; `sampled` maps row index -> new token for rows that sampled.

        Returns (seq, new_token or None) for every still-relevant row; sequences that hit a
        stop condition are finished (blocks freed) and carry `finish_reason`.
        """
        out = []
        for i, lo, hi in batch.scoring:
            if batch.seqs[i].status is SeqStatus.RUNNING:
                batch.seqs[i].prompt_scored = hi
        for i, (seq, end) in enumerate(zip(batch.seqs, batch.ends)):
            if seq.status is not SeqStatus.RUNNING:
                continue  # cancelled or preempted while the step ran
            seq.num_cached = end
            if self.prefix is not None:
                self.prefix.register(seq)   # before a finish below frees the blocks
            tok = sampled.get(i)
            if tok is not None:
                seq.token_ids.append(tok)
                reason = None
                m = seq.matcher
                if m is not None and not m.consume(tok):
                    # only a bug or a NaN row can sample a token the mask forbade
                    seq.error = ValueError(f"token {tok} violates the request's grammar: {m.error}")
                    reason = "error"
                elif tok in seq.stop_ids:
                    reason = "stop"
                elif m is not None and m.is_finished():
                    reason = "stop"     # the output is complete (the mask would allow only EOS now)
                elif seq.num_output >= seq.max_tokens or len(seq) >= self.max_model_len:
                    reason = "length"
                if reason is not None:
                    self.finish(seq, reason)
            elif seq.max_tokens == 0 and end == len(seq):
                self.finish(seq, "length")      # prefill only: the prompt is done (and scored)
            out.append((seq, tok))
        return out

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "free_blocks": self.alloc.num_free,
            "total_blocks": self.alloc.num_blocks,
            "block_size": self.block_size,
            "preemptions": self.num_preemptions,
            "prefix_caching": self.prefix is not None,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "prefix_cache_hit_rate": self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "cached_blocks": self.alloc.num_cached,
        }
