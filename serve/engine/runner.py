"""The lean model's runner: a scheduler `Batch` in, the logits of its sampling rows out
(followed by those of the prompt positions `batch.scoring` lists, when a request scores
its prompt: only those rows go through the LM head, so other requests pay nothing).

It flattens the batch's rows (decode rows first, then prefill chunks) into token ids,
positions and KV slots, builds the step's attention metadata (`StepMeta`), and replays a
CUDA graph instead when the step is decode-only and one was captured for its size.
"""

from __future__ import annotations

import torch

from slotserve.models.cpu_ops import cpu_decode_plan
from slotserve.models.llama import LeanModel, StepMeta


class LeanRunner:
    """Turns a scheduler `Batch` into model inputs and returns the logits of sampling rows."""

    path = "lean"

    def __init__(self, model: LeanModel, block_size: int, max_blocks_per_seq: int):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.vocab_size = model.cfg.vocab_size
        self.graphs = None                     # cuda_graphs.DecodeGraphs when captured

    def weights(self) -> list[torch.Tensor]:
        return self.model.weights()

    def release(self, seq) -> None:
        pass  # all per-sequence state lives in the block table

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def forward(self, batch) -> torch.Tensor:
        """-> logits [R + Q, V] fp32: the R sampling rows in batch order, then the Q positions of
        `batch.scoring` in its order."""
        dev = self.device
        nd = batch.num_decode
        lora = self.model.lora
        if nd == len(batch.seqs) and self.graphs is not None and nd <= self.graphs.max_batch:
            if lora is not None:   # the graph reads the rows buffer; padding rows run the base
                lora.set_rows([s.adapter for s in batch.seqs[:nd]], pad_to=self.graphs.max_batch)
            return self.graphs.run(self, batch)
        ids, pos, slots, tables, lens = self.decode_inputs(batch) if nd else ([], [], [], [], [])
        seqs, rows, flat = [], list(range(nd)), {}
        for i, (seq, start, end, samples, table) in enumerate(zip(batch.seqs[nd:], batch.starts[nd:], batch.ends[nd:],
                                                                  batch.samples[nd:], batch.tables[nd:]), nd):
            flat[i] = len(ids) - start                 # row of position p in the flattened tokens: flat[i] + p
            seqs.append((len(ids), start, end, torch.tensor(table, dtype=torch.int64, device=dev)))
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += self._slots(table, start, end)
            if samples:
                rows.append(len(ids) - 1)
        for i, lo, hi in batch.scoring:
            rows += range(flat[i] + lo, flat[i] + hi)
        if lora is not None:   # decode rows, then each prefill chunk's rows: the sequence's adapter
            lora.set_rows([s.adapter for s in batch.seqs[:nd]]
                          + [s.adapter for s, a, b in zip(batch.seqs[nd:], batch.starts[nd:], batch.ends[nd:])
                             for _ in range(b - a)])
        meta = StepMeta(nd, torch.tensor(slots, dtype=torch.int64, device=dev), seqs=seqs)
        if nd:
            meta.block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
            meta.seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            if dev.type == "cpu":
                meta.cpu_plan = cpu_decode_plan(tables, lens, self.block_size)
        h, res = self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                                    torch.tensor(pos, dtype=torch.int64, device=dev), meta)
        if not rows:
            return h.new_zeros((0, self.vocab_size), dtype=torch.float32)
        if len(rows) < h.shape[0] or batch.scoring:   # (scored rows come after the sampling ones)
            r = torch.tensor(rows, dtype=torch.int64, device=dev)
            h, res = h.index_select(0, r), res.index_select(0, r)
        return self.model.logits(h, res)

    def decode_inputs(self, batch, width: int | None = None):
        """Host-side inputs of the batch's decode rows: ids, positions, slots, block_tables
        (padded to `width`), seq_lens; from the batch's snapshot, never the live sequences
        (a cancel may release one while the step runs)."""
        bs, nd = self.block_size, batch.num_decode
        seqs, pos, tbls = batch.seqs[:nd], batch.starts[:nd], batch.tables[:nd]
        ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tbls, pos)]
        width = width or max(len(t) for t in tbls)
        tables = [t + [0] * (width - len(t)) for t in tbls]
        lens = [p + 1 for p in pos]
        return ids, pos, slots, tables, lens
