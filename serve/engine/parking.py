"""Parking an idle engine's weights in host memory (pinned on CUDA) and bringing them back.

When the GPU cannot hold `previous` next to live and a candidate, the slot manager parks
previous: its weights move to pinned host memory (so the copy back is one fast DMA),
its KV pool is dropped (an idle engine's KV holds nothing worth keeping) and so are its
CUDA graphs (they point at the old addresses). Rolling back to it copies the weights
back, allocates a fresh KV pool and recaptures the graphs — safe while live serves,
since each engine captures on its own stream in thread-local mode.

Each engine owns a `WeightParker`, which holds the host copies while it is parked. Only
tensors the engine holds *exclusively* move: a tensor it shares with another engine
through the `TensorPool` stays where it is (moving it would free nothing, and that engine
still computes with it); `ParkState.shared_bytes` reports how much stayed. On CPU, "host"
is the same memory as "device"; parking there clones the exclusive tensors anyway so
tests exercise exactly the code path the GPU takes. The engine decides when to park
(idle, no step running) and keeps requests out meanwhile: `Engine.park` / `Engine.unpark`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slotserve.engine import kv_cache  # KVCache through its module, so tests can inject an OOM
from slotserve.engine.cuda_graphs import empty_cache
from slotserve.engine.weights import TensorPool


@dataclass(frozen=True)
class ParkState:
    """What `Engine.park` did (and `unpark` will undo)."""
    moved_bytes: int                   # weight bytes copied to host; unpark copies them back
    shared_bytes: int                  # weight bytes left on the device: another engine holds them too
    kv_bytes: int                      # KV pool freed; unpark allocates it again
    pinned: bool                       # host copies are in pinned memory (CUDA)
    graphs: bool                       # CUDA graphs were dropped; unpark recaptures them


class WeightParker:
    """One engine's weights in host memory while it is parked: the host copies and, for
    each, the tensor-pool key its device tensor was claimed under (so that unparking
    shares what another engine loaded meanwhile instead of copying it)."""

    def __init__(self, pool: TensorPool | None, owner: object, kv_layout: kv_cache.KVLayout | None):
        self.pool, self.owner = pool, owner
        self.kv_layout = kv_layout                                # what unpark allocates again
        self._host: dict[int, tuple[torch.Tensor, object]] = {}   # id(host copy) -> (it, pool key)

    def park(self, runner, pin: bool) -> tuple[int, int, bool]:
        """Copy the weights `runner` holds alone to host memory (pinned when `pin`), point
        the model at the copies and drop the device references this engine owns: its
        CUDA graphs and its pool claims on what moved -> (bytes moved, bytes left on the
        device because another engine holds them too, graphs dropped). If a host copy
        cannot be made (host out of memory) nothing has changed."""
        pool, owner = self.pool, self.owner
        claims = pool.claims(owner) if pool is not None and owner is not None else {}
        key_of = {id(t): k for k, (t, _) in claims.items()}
        shared = {id(t) for t, holders in claims.values() if holders > 1}
        del claims
        weights = [t for t in runner.weights() if t is not None]
        # 1. host copies of what we hold alone (may fail, e.g. host OOM: nothing changed yet)
        host, moved, kept, seen = {}, 0, 0, set()
        for t in weights:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in shared:
                kept += t.nbytes
            else:
                host[id(t)] = _to_host(t, pin)
                moved += t.nbytes
        t = None
        # 2. point the model at them and drop every device reference we own (no allocation)
        had_graphs = getattr(runner, "graphs", None) is not None
        if had_graphs:
            runner.graphs.release()
            runner.graphs = None
        if runner.path == "lean":
            runner.model.replace_weights(host)
            runner.model.kv_layers = []
            self._host = {id(h): (h, key_of.get(i)) for i, h in host.items()}
        else:  # transformers fallback: never pooled; in place, so the Parameter objects stay
            params = [p for p in weights if id(p) in host]
            for p in params:
                p.data = host[id(p)]
            self._host = {id(p): (p, None) for p in params}
            del params
        del weights
        for i in host:
            if key_of.get(i) is not None:
                pool.release_key(key_of[i], owner)
        return moved, kept, had_graphs

    def unpark(self, runner) -> tuple[int, kv_cache.KVCache | None]:
        """Copy the parked weights back to the device (a weight another engine loaded
        meanwhile, same pool key, is shared instead) and allocate a fresh KV pool; point
        the model at both -> (bytes copied, the new KV pool). Raises (out of memory, ...)
        with nothing changed: the engine stays parked."""
        dev = runner.device
        pool, owner = self.pool, self.owner
        back, acquired, nbytes = {}, [], 0

        def copy(h: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            nbytes += h.nbytes
            return h.clone() if dev.type == "cpu" else h.to(dev, non_blocking=True)

        kv = None
        try:
            for i, (h, key) in self._host.items():
                if key is not None and pool is not None:
                    back[i] = pool.acquire(key, owner, lambda h=h: copy(h))
                    acquired.append(key)
                else:
                    back[i] = copy(h)
            if self.kv_layout is not None:
                kv = kv_cache.KVCache(self.kv_layout, dev)
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()   # copies done before the engine's stream reads
        except BaseException:
            for key in acquired:
                pool.release_key(key, owner)
            back = kv = None
            if dev.type == "cuda":
                empty_cache()
            raise
        if runner.path == "lean":
            runner.model.replace_weights(back)
            runner.model.kv_layers = kv.layers if kv is not None else []
        else:
            for p in runner.weights():
                if p is not None and id(p) in back:
                    p.data = back[id(p)].data
        self._host = {}
        return nbytes, kv

    def drop(self) -> None:
        """Forget the host copies (the engine closed while parked)."""
        self._host = {}


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of `t` (pinned when `pin`); on CPU a clone, so parking there takes the GPU's path."""
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty_like(t, device="cpu", pin_memory=pin)
    host.copy_(t)
    return host
