"""Decode steps replayed as CUDA graphs (CUDA only; the engine never builds this on CPU).

A decode step for batch size B is a fixed sequence of kernel launches once its inputs
live in static buffers, so we capture the whole lean forward + LM head for B in
[1, 2, 4, 8, 16, 32, ...] up to max_batch and replay the smallest graph >= B with the
batch padded: padding rows write no KV (slot -1) and attend one token of block 0; their
logits are dropped. Graphs share one memory pool (captured largest first). Any failure
to capture (e.g. an op that syncs with the host) leaves the engine decoding eagerly.
"""

from __future__ import annotations

import logging

import torch

from slotserve.model import StepMeta

log = logging.getLogger("slotserve.cuda_graphs")


def graph_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    @classmethod
    def try_capture(cls, runner, max_batch: int) -> "DecodeGraphs | None":
        try:
            return cls(runner, max_batch)
        except Exception as e:  # noqa: BLE001 - any capture problem means "run eagerly"
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            torch.cuda.synchronize()
            return None

    def __init__(self, runner, max_batch: int):
        model, dev = runner.model, runner.device
        assert dev.type == "cuda", "CUDA graphs need a CUDA device"
        self.sizes = graph_sizes(max_batch)
        self.max_batch = n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros((n, runner.max_blocks), dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        pool = None
        for bs in reversed(self.sizes):
            meta = StepMeta(bs, self.slots[:bs], block_tables=self.tables[:bs], seq_lens=self.lens[:bs])
            model.logits(*model.forward(self.ids[:bs], self.pos[:bs], meta))  # warm-up: compiles kernels
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.out[bs] = model.logits(*model.forward(self.ids[:bs], self.pos[:bs], meta))
            pool = g.pool() if pool is None else pool
            self.graphs[bs] = g
        torch.cuda.synchronize()

    def run(self, runner, seqs) -> torch.Tensor:
        b = len(seqs)
        bs = next(s for s in self.sizes if s >= b)
        ids, pos, slots, tables, lens = runner.decode_inputs(seqs)
        width = len(tables[0])
        host = torch.tensor([ids, pos, slots, lens], dtype=torch.int64).pin_memory()
        dev = host.to(self.ids.device, non_blocking=True)
        self.ids[:b].copy_(dev[0])
        self.pos[:b].copy_(dev[1])
        self.slots[:b].copy_(dev[2])
        self.lens[:b].copy_(dev[3])
        self.tables[:b, :width].copy_(torch.tensor(tables, dtype=torch.int32).pin_memory(), non_blocking=True)
        if bs > b:  # padding rows: no KV write, attend one token
            self.slots[b:bs].fill_(-1)
            self.lens[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.out[bs][:b]

    def release(self) -> None:
        self.graphs.clear()
        self.out.clear()
