"""Continuous batching: which sequences run in the next step, and what happens after it.

One step is either a *prefill* step (prompt tokens of one or more sequences, capped at
`max_prefill_tokens` in total, long prompts split into chunks over several steps) or a
*decode* step (one token for every running sequence whose prompt is done). When both
kinds of work exist the steps alternate, so a new long prompt stalls running streams
for at most one capped prefill step at a time.

Memory rules (the pool is `BlockAllocator`):
- admission is FIFO and reserves the blocks for the whole (remaining) prompt, so a
  sequence whose prefill started never waits for blocks;
- a decode step that needs a new block and finds none *preempts by recompute*: the most
  recently admitted sequence frees its blocks and goes back to the front of the queue
  (its prompt + output so far is prefilled again later);
- the engine refuses up front any request that could not fit the pool alone, so the
  queue always drains.

This file owns no tensors and no threads; the engine holds the lock around every call.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from slotserve.kv_cache import BlockAllocator, blocks_for


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

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def in_decode(self) -> bool:
        """Everything but the last sampled token is cached: ready for a decode step."""
        return self.num_cached == len(self.token_ids) - 1


@dataclass
class Batch:
    """One model step: for each sequence the token range [start, end) to compute.

    A row samples a token when its range reaches the end of the sequence (`samples[i]`).
    For decode, start = num_cached and end = start + 1 for every row.
    """

    kind: str                          # "prefill" | "decode"
    seqs: list[Sequence]
    starts: list[int]
    ends: list[int]

    @property
    def samples(self) -> list[bool]:
        return [e == len(s) for s, e in zip(self.seqs, self.ends)]

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
    ):
        assert max_batch >= 1 and max_prefill_tokens >= 1
        self.alloc = allocator
        self.block_size = allocator.block_size
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.on_release = on_release or (lambda seq: None)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # admission order
        self._last_kind = "decode"
        self.num_preemptions = 0

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
        seq.num_cached = 0
        self.on_release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # --- scheduling ----------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        decodable = any(s.in_decode for s in self.running)
        want_prefill = bool(self.waiting) or any(s.num_cached < len(s) - 1 for s in self.running)
        if want_prefill and (not decodable or self._last_kind == "decode"):
            batch = self._schedule_prefill()
            if batch is not None:
                self._last_kind = "prefill"
                return batch
        if decodable:
            batch = self._schedule_decode()
            if batch is not None:
                self._last_kind = "decode"
                return batch
        return None

    def _schedule_prefill(self) -> Batch | None:
        budget = self.max_prefill_tokens
        seqs, starts, ends = [], [], []
        # 1) sequences admitted earlier whose prompt is still being prefilled (chunked)
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_cached < len(seq) - 1:  # (== len-1 is a plain decode row)
                n = min(len(seq) - seq.num_cached, budget)
                seqs.append(seq), starts.append(seq.num_cached), ends.append(seq.num_cached + n)
                budget -= n
        # 2) admit from the queue, strictly FIFO (no overtaking), reserving whole prompts
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = blocks_for(len(seq), self.block_size)
            if not self.alloc.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_table = self.alloc.allocate(need)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq), budget)
            seqs.append(seq), starts.append(0), ends.append(n)
            budget -= n
        if not seqs:
            return None
        return Batch("prefill", seqs, starts, ends)

    def _schedule_decode(self) -> Batch | None:
        todo = deque(self.running)
        scheduled: list[Sequence] = []
        while todo:
            seq = todo.popleft()
            if not seq.in_decode:
                continue
            need_block = seq.num_cached == len(seq.block_table) * self.block_size
            if need_block:
                while not self.alloc.can_allocate(1):
                    # Preempt the newest sequence not yet scheduled; if none is left, this one.
                    victim = todo.pop() if todo else seq
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
                seq.block_table.extend(self.alloc.allocate(1))
            scheduled.append(seq)
        if not scheduled:
            return None
        starts = [s.num_cached for s in scheduled]
        return Batch("decode", scheduled, starts, [x + 1 for x in starts])

    # --- after the step ----------------------------------------------------------------------
    def postprocess(self, batch: Batch, sampled: dict[int, int]) -> list[tuple[Sequence, int | None]]:
        """Advance each row; `sampled` maps row index -> new token for rows that sampled.

        Returns (seq, new_token or None) for every still-relevant row; sequences that hit a
        stop condition are finished (blocks freed) and carry `finish_reason`.
        """
        out = []
        for i, (seq, end) in enumerate(zip(batch.seqs, batch.ends)):
            if seq.status is not SeqStatus.RUNNING:
                continue  # cancelled or preempted while the step ran
            seq.num_cached = end
            tok = sampled.get(i)
            if tok is not None:
                seq.token_ids.append(tok)
                reason = None
                if tok in seq.stop_ids:
                    reason = "stop"
                elif seq.num_output >= seq.max_tokens or len(seq) >= self.max_model_len:
                    reason = "length"
                if reason is not None:
                    self.finish(seq, reason)
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
        }
