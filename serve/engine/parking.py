"""Parking: an idle engine's weights to host memory (pinned on CUDA) and back.

`Parking` is mixed into `Engine` (serve/engine.py). `park()` moves the weights the engine
holds alone to host memory and drops its KV pool and CUDA graphs; `unpark()` brings them
back. Tensors shared through the `TensorPool` with another engine stay where they are
(moving them would free nothing and pull them out from under that engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from slotserve.engine import kv_cache  # KVCache through its module, so tests can inject an OOM
from slotserve.engine.request import EngineClosedError

log = logging.getLogger("slotserve.engine")


@dataclass(frozen=True)
class ParkState:
    """What `Engine.park` did (and `unpark` will undo)."""
    moved_bytes: int                   # weight bytes copied to host; unpark copies them back
    shared_bytes: int                  # weight bytes left on the device: another engine holds them too
    kv_bytes: int                      # KV pool freed; unpark allocates it again
    pinned: bool                       # host copies are in pinned memory (CUDA)
    graphs: bool                       # CUDA graphs were dropped; unpark recaptures them


class Parking:
    """The tier half of `Engine`: park / unpark, one at a time under `_op_lock`."""

    def park(self, pin_memory: bool = True) -> int:
        """Move the weights this engine holds alone to host memory (pinned when `pin_memory`
        and the device is CUDA) and free its KV pool and CUDA graphs -> weight bytes moved.

        The engine must be idle: with requests queued or running this raises RuntimeError
        (drain first); once parked, `submit` raises EngineParkedError until `unpark()`.
        Tensors another engine also holds through the TensorPool stay on the device, with
        this engine's claim (moving them would free nothing); `parked.shared_bytes` says
        how many. On CPU the "host" copy is a clone, so the path is the GPU one. Parking
        a parked engine returns 0. If a host copy cannot be made nothing changes.
        """
        with self._op_lock:
            with self._cond:
                if self._closed:
                    raise EngineClosedError("engine is closed")
                if self._tier != "device":
                    return 0
                busy = len(self.scheduler.running) + len(self.scheduler.waiting)
                if busy:
                    raise RuntimeError(f"cannot park: {busy} requests queued or running; let them finish "
                                       "(or cancel them) first")
                self._tier = "moving"                      # submit refuses from here on
                while self._in_step and not self._closed:  # a step whose requests were all cancelled
                    self._cond.wait()
                if self._closed:
                    raise EngineClosedError("engine closed while parking")
            try:
                state = self._park(pin_memory and self.device.type == "cuda")
            except BaseException:
                with self._cond:
                    self._tier = "device"
                raise
            with self._cond:
                self._parked, self._tier = state, "host"
            log.info("%s parked: %d weight bytes to host%s, %d shared bytes left on %s, %d KV bytes freed",
                     self.model_dir, state.moved_bytes, " (pinned)" if state.pinned else "",
                     state.shared_bytes, self.device, state.kv_bytes)
            return state.moved_bytes

    def _park(self, pin: bool) -> ParkState:
        runner = self.runner
        self._sync_stream()                                # nothing of ours may still read them
        claims = self._pool.claims(self._owner) if self._pool is not None and self._owner is not None else {}
        key_of = {id(t): k for k, (t, _) in claims.items()}
        shared = {id(t) for t, holders in claims.values() if holders > 1}
        del claims
        # 1. host copies of what we hold alone (may fail, e.g. host OOM: nothing changed yet)
        host, moved, kept, seen = {}, 0, 0, set()
        for t in self.weight_tensors():
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
            params = [p for p in self.weight_tensors() if id(p) in host]
            for p in params:
                p.data = host[id(p)]
            self._host = {id(p): (p, None) for p in params}
            del params
        for i in host:
            if key_of.get(i) is not None:
                self._pool.release_key(key_of[i], self._owner)
        kv_bytes = 0
        with self._cond:   # the prefix cache's keys name K/V in the pool dropped below
            self.scheduler.clear_prefix_cache()
        if self.kv is not None:
            kv_bytes = self.kv.nbytes
            self.kv.release()
            self.kv = None
        if self.device.type == "cuda":
            _empty_cache()
        return ParkState(moved, kept, kv_bytes, pin, had_graphs)

    def unpark(self) -> int:
        """Copy the parked weights back to the device, allocate a fresh KV pool and, on CUDA,
        recapture the decode graphs -> weight bytes copied. A weight another engine loaded
        meanwhile (same TensorPool key) is shared instead of copied. Raises (out of memory,
        ...) with the engine still parked. 0 when not parked."""
        with self._op_lock:
            with self._cond:
                if self._closed:
                    raise EngineClosedError("engine is closed")
                if self._tier != "host":
                    return 0
                state = self._parked
                self._tier = "moving"
            try:
                n = self._unpark(state)
            except BaseException:
                with self._cond:
                    self._tier = "host"
                raise
            with self._cond:
                self._parked, self._tier = None, "device"
            return n

    def _unpark(self, state: ParkState) -> int:
        dev, runner = self.device, self.runner
        pool, owner = self._pool, self._owner
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
            if self._kv_layout is not None:
                kv = kv_cache.KVCache(self._kv_layout, dev)
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()   # copies done before the engine's stream reads
        except BaseException:
            for key in acquired:
                pool.release_key(key, owner)
            back = kv = None
            if dev.type == "cuda":
                _empty_cache()
            raise
        if runner.path == "lean":
            runner.model.replace_weights(back)
            runner.model.kv_layers = kv.layers if kv is not None else []
        else:
            for p in self.weight_tensors():
                if id(p) in back:
                    p.data = back[id(p)].data
        self.kv, self._host = kv, {}
        if dev.type == "cuda" and state.graphs and runner.path == "lean":
            from slotserve.engine.cuda_graphs import DecodeGraphs

            runner.graphs = DecodeGraphs.try_capture(runner, self.max_batch, self._stream)
        return nbytes

    def _sync_stream(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


# ---------------------------------------------------------------------------------- helpers
def _empty_cache() -> None:
    from slotserve.engine.cuda_graphs import empty_cache   # not while another engine captures

    empty_cache()


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of `t` (pinned when `pin`); on CPU a clone, so parking there takes the GPU's path."""
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty_like(t, device="cpu", pin_memory=pin)
    host.copy_(t)
    return host
