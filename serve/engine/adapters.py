"""The LoRA adapters one engine serves: names -> slots of the model's `LoraTable`.

`EngineAdapters` owns the table and its changes; the engine calls it under its lock with
no step in flight (a table swap between two steps, never under one). Adding or removing an
adapter rebuilds the stacked weights (small: an adapter's bytes), keeps the per-row index
buffer, remaps the slot of each queued or running sequence, and re-captures the CUDA decode
graphs so they read the new stacks. Each sequence's prefix-cache keys are rooted in its
adapter's content digest, so two adapters never share K/V for the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from slotserve.engine.prefix_cache import adapter_root
from slotserve.models.lora import Adapter, LoraTable


class EngineAdapters:
    def __init__(self, runner, max_batch: int, stream=None):
        self.runner, self.max_batch, self.stream = runner, max_batch, stream
        self.by_name: dict[str, Adapter] = {}

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    @property
    def nbytes(self) -> int:
        table = self.runner.model.lora
        return table.nbytes if table is not None else 0

    def _check_lean(self) -> None:
        if getattr(self.runner, "path", None) != "lean":
            raise ValueError("LoRA adapters need the lean model; this engine runs the transformers fallback")

    def add(self, name: str, adapter_dir: str | Path, seqs) -> Adapter:
        self._check_lean()
        if name in self.by_name:
            raise ValueError(f"adapter {name!r} is already loaded in this engine")
        model = self.runner.model
        adapter = Adapter.load(name, adapter_dir, model.cfg)
        self._rebuild({**self.by_name, name: adapter}, seqs)
        return adapter

    def remove(self, name: str, seqs) -> None:
        if name not in self.by_name:
            raise ValueError(f"no adapter {name!r} in this engine; loaded: {', '.join(self.by_name) or 'none'}")
        idx = list(self.by_name).index(name)
        if any(s.adapter == idx for s in seqs):
            raise ValueError(f"adapter {name!r} still has requests in flight")
        self._rebuild({k: v for k, v in self.by_name.items() if k != name}, seqs)

    def bind(self, seq, name: str | None) -> None:
        """Set `seq`'s slot and prefix-cache root for adapter `name` (None: the base)."""
        if name is None:
            seq.adapter, seq.prefix_root = -1, None
            return
        if name not in self.by_name:
            raise ValueError(f"no adapter {name!r} in this engine; loaded: {', '.join(self.by_name) or 'none'}")
        seq.adapter = list(self.by_name).index(name)
        seq.prefix_root = adapter_root(self.by_name[name].digest)

    def _rebuild(self, new: dict[str, Adapter], seqs) -> None:
        model, runner = self.runner.model, self.runner
        old_names = list(self.by_name)
        old = model.lora
        model.lora = LoraTable(list(new.values()), model.cfg, model.device, model.dtype,
                               rows=old.rows if old is not None else None, max_batch=self.max_batch) if new else None
        self.by_name = dict(new)
        names = list(new)
        for s in seqs:
            if s.adapter >= 0:
                s.adapter = names.index(old_names[s.adapter])
        graphs = getattr(runner, "graphs", None)
        if graphs is not None:   # captured against the old stacks: capture again
            from slotserve.engine.cuda_graphs import DecodeGraphs

            graphs.release()
            runner.graphs = DecodeGraphs.try_capture(runner, self.max_batch, self.stream)
