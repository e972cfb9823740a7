"""Tiers: where a slot's tensors live — on the serving device, or parked in host memory.

When the GPU cannot hold `previous` next to live and a candidate, the slot manager parks
previous: its weights move to pinned host memory (so the copy back is one fast DMA),
its KV pool is dropped (an idle engine's KV holds nothing worth keeping) and so are its
CUDA graphs (they point at the old addresses). Rolling back to it copies the weights
back, allocates a fresh KV pool and recaptures the graphs.

Only tensors the engine holds *exclusively* move: a tensor it shares with another
resident slot (tensor pool dedup) stays where it is, since moving it would free
nothing. On CPU, "host" is the same memory as "device"; parking there clones the
exclusive tensors anyway so tests exercise exactly the code path the GPU takes.

This reaches into the engine's runner (LeanModel attributes, KVCache) because the
engine has no public move API yet; keep it in sync with serve/model.py and
serve/engine.py until it does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from slotserve.kv_cache import KVCache


@dataclass(frozen=True)
class Parked:
    moved: frozenset[int]     # id() of the host tensors that unpark must copy back
    moved_bytes: int
    kv_layout: object | None  # KVLayout to reallocate on unpark (lean path)
    had_graphs: bool


def storage_key(t: torch.Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()  # a separate copy, so the CPU path mirrors the GPU one
    host = t.to("cpu")
    return host.pin_memory() if torch.cuda.is_available() else host


def _lean_tensor_slots(model):
    """(owner object, attribute name) for every weight tensor of a LeanModel."""
    for name in ("embed", "norm", "lm_head"):
        yield model, name
    for layer in model.layers:
        for f in dataclasses.fields(layer):
            yield layer, f.name


def park(engine, keep: set[tuple[int, str]]) -> Parked:
    """Move `engine`'s exclusive weights to host and free its KV pool and graphs.

    `keep`: storage keys other resident slots use; those tensors stay in place. The
    engine must be idle (the slot manager drains the slot first).
    """
    runner = engine.runner
    had_graphs = getattr(runner, "graphs", None) is not None
    if had_graphs:
        runner.graphs.release()
        runner.graphs = None
    moved, nbytes, done = set(), 0, {}
    if runner.path == "lean":
        for obj, attr in _lean_tensor_slots(runner.model):
            t = getattr(obj, attr)
            if t is None or storage_key(t) in keep:
                continue
            if id(t) not in done:  # tied weights: one copy, same object on both names
                done[id(t)] = _to_host(t)
                moved.add(id(done[id(t)]))
                nbytes += t.nbytes
            setattr(obj, attr, done[id(t)])
        layout = engine.kv.layout if engine.kv is not None else None
        if engine.kv is not None:
            engine.kv.release()
            runner.model.kv_layers = []
    else:  # transformers fallback: never pooled, so everything is exclusive
        layout = None
        for p in list(runner.model.parameters()) + list(runner.model.buffers()):
            nbytes += p.data.nbytes
            p.data = _to_host(p.data)  # in place: the Parameter object stays, so id(p) does
            moved.add(id(p))
    # The pool would keep the device copies alive; the parked engine's claims go.
    pool, owner = getattr(engine, "_pool", None), getattr(engine, "_owner", None)
    if pool is not None and owner is not None:
        pool.release(owner)
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return Parked(frozenset(moved), nbytes, layout, had_graphs)


def unpark(engine, parked: Parked, recapture: bool = True) -> int:
    """Copy parked weights back to the engine's device; new KV pool; recapture graphs
    (only when `recapture`: capturing while another engine runs is unsafe, see slots)."""
    dev = engine.device
    runner = engine.runner

    def back(t: torch.Tensor) -> torch.Tensor:
        if dev.type == "cpu":
            return t.clone()
        return t.to(dev, non_blocking=True)

    nbytes, done = 0, {}
    if runner.path == "lean":
        for obj, attr in _lean_tensor_slots(runner.model):
            t = getattr(obj, attr)
            if t is None or id(t) not in parked.moved:
                continue
            if id(t) not in done:
                done[id(t)] = back(t)
                nbytes += t.nbytes
            setattr(obj, attr, done[id(t)])
        if parked.kv_layout is not None:
            engine.kv = KVCache(parked.kv_layout, dev)
            runner.model.kv_layers = engine.kv.layers
    else:
        for p in list(runner.model.parameters()) + list(runner.model.buffers()):
            if id(p) in parked.moved:
                nbytes += p.data.nbytes
                p.data = back(p.data)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        if parked.had_graphs and recapture:
            from slotserve.cuda_graphs import DecodeGraphs

            runner.graphs = DecodeGraphs.try_capture(runner, engine.max_batch)
    return nbytes
