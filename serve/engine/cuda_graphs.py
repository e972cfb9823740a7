"""Decode steps replayed as CUDA graphs (CUDA only; the engine never builds this on CPU).

A decode step for batch size B is a fixed sequence of kernel launches once its inputs
live in static buffers, so we capture the whole lean forward + LM head for B in
[1, 2, 4, 8, 16, 32, ...] up to max_batch and replay the smallest graph >= B with the
batch padded: padding rows write no KV (slot -1) and attend one token of block 0; their
logits are dropped. Graphs share one memory pool (captured largest first). Any failure
to capture (e.g. an op that syncs with the host) leaves the engine decoding eagerly.

Capturing beside a running engine: the capture (and its warm-up, and the static
buffers) runs on the capturing engine's own stream — the one its step thread replays
on — in "thread_local" capture mode, so CUDA calls made meanwhile by *other* threads
(another engine's steps, syncs, allocations) are legal; with the default "global" mode
they failed with "operation not permitted when stream is capturing". The memory pool
(`torch.cuda.graph_pool_handle()`) is this engine's alone. Captures in the process are
serialized by `_CAPTURE_LOCK` (torch allows one capture at a time), and the engine's
`empty_cache()` calls take the same lock (the allocator refuses to free cached blocks
while any capture is underway). Untested on GPU hardware so far: see docs/engine.md.
"""

from __future__ import annotations

import logging
import threading

import torch

from slotserve.models.llama import StepMeta

log = logging.getLogger("slotserve.cuda_graphs")
_CAPTURE_LOCK = threading.Lock()


def empty_cache() -> None:
    """`torch.cuda.empty_cache()`, never during a capture: torch's allocator asserts that no
    capture is underway when it frees cached blocks, whichever thread asks."""
    with _CAPTURE_LOCK:
        torch.cuda.empty_cache()


_STREAMS_LOCK = threading.Lock()
_STREAMS_IN_USE: set[tuple[int, int]] = set()     # (device index, stream handle) of open engines


def acquire_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream for one engine, used by no other open engine.

    `torch.cuda.Stream()` hands out torch's pooled streams round robin (32 per device and
    priority), so after enough loads a fresh one can be a running engine's, and one
    engine's capture would then take in the other's kernels. Release with `release_stream`.
    """
    with _STREAMS_LOCK:
        for _ in range(64):
            s = torch.cuda.Stream(device)
            key = (s.device.index, s.cuda_stream)
            if key not in _STREAMS_IN_USE:
                _STREAMS_IN_USE.add(key)
                return s
    raise RuntimeError(f"no free CUDA stream on {device}: every pooled stream belongs to an open engine")


def release_stream(stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        with _STREAMS_LOCK:
            _STREAMS_IN_USE.discard((stream.device.index, stream.cuda_stream))


def graph_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    @classmethod
    def try_capture(cls, runner, max_batch: int, stream: torch.cuda.Stream) -> "DecodeGraphs | None":
        """Capture on `stream`, the engine's own (its step thread replays there)."""
        try:
            return cls(runner, max_batch, stream)
        except Exception as e:  # noqa: BLE001 - any capture problem means "run eagerly"
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            try:
                stream.synchronize()
            except Exception:  # noqa: BLE001
                log.exception("synchronizing the engine's stream after a failed capture failed")
            return None

    def __init__(self, runner, max_batch: int, stream: torch.cuda.Stream):
        model, dev = runner.model, runner.device
        assert dev.type == "cuda", "CUDA graphs need a CUDA device"
        self.sizes = graph_sizes(max_batch)
        self.max_batch = n = self.sizes[-1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        with _CAPTURE_LOCK, torch.cuda.device(dev), torch.cuda.stream(stream):
            # static inputs allocated on the stream that uses them
            self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
            self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
            self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
            self.tables = torch.zeros((n, runner.max_blocks), dtype=torch.int32, device=dev)
            self.lens = torch.ones(n, dtype=torch.int32, device=dev)
            self.mempool = torch.cuda.graph_pool_handle()   # this engine's graphs only
            for bs in reversed(self.sizes):
                meta = StepMeta(bs, self.slots[:bs], block_tables=self.tables[:bs], seq_lens=self.lens[:bs])
                model.logits(*model.forward(self.ids[:bs], self.pos[:bs], meta))  # warm-up: compiles kernels
                stream.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.mempool, stream=stream, capture_error_mode="thread_local"):
                    self.out[bs] = model.logits(*model.forward(self.ids[:bs], self.pos[:bs], meta))
                self.graphs[bs] = g
            stream.synchronize()

    def run(self, runner, batch) -> torch.Tensor:
        """Replay the graph for a decode-only `batch` (scheduler.Batch) padded to a captured size."""
        b = batch.num_decode
        bs = next(s for s in self.sizes if s >= b)
        ids, pos, slots, tables, lens = runner.decode_inputs(batch)
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
