"""LoRA adapters on the lean model: a table of adapters, applied per row with `K.lora`.

`Adapter` is one PEFT LoRA adapter read from its directory (adapter_config.json +
adapter_model.safetensors, checked against the model's shapes). `LoraTable` stacks the
adapters an engine holds per projection (A [n, R, in], B [n, out, R], zero-padded to the
largest rank and zero for an adapter that does not target the projection, which leaves
its rows exact) and owns the per-row adapter index: a static int32 buffer the runner fills
before each step (-1 = the plain base model), so a captured CUDA graph reads the new
indices on replay. The fused projections (q|k|v, gate|up) take each slice's delta at its
column offset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slotserve import kernels as K

# lean projection -> the PEFT modules fused in it, in column order
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
_PREFIX = "base_model.model.model.layers."
ROWS = 1024   # static per-row index buffer: covers every decode graph size (max_batch <= 1024)


def module_dims(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) features of each PEFT target module of a LeanConfig."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class Adapter:
    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r, in], B [out, r])
    digest: str        # sha256 of its two files: scopes the prefix cache to this content

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @classmethod
    def load(cls, name: str, adapter_dir: str | Path, cfg) -> "Adapter":
        """Read and check a PEFT LoRA adapter for a model of LeanConfig `cfg` (ValueError says why not)."""
        from safetensors.torch import load_file

        d = Path(adapter_dir)
        cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
        if not cfg_path.is_file() or not w_path.is_file():
            raise ValueError(f"adapter {name}: {d} needs adapter_config.json and adapter_model.safetensors")
        conf = json.loads(cfg_path.read_text(encoding="utf-8"))
        r, alpha = int(conf["r"]), float(conf.get("lora_alpha", 8))
        scaling = alpha / (r ** 0.5 if conf.get("use_rslora") else r)
        dims = module_dims(cfg)
        raw = load_file(str(w_path))
        weights: dict[tuple[int, str], list] = {}
        for key, t in raw.items():
            if not key.startswith(_PREFIX):
                raise ValueError(f"adapter {name}: unexpected tensor {key}")
            layer_s, _, mod, ab, _ = key[len(_PREFIX):].split(".")
            layer = int(layer_s)
            if mod not in dims or layer >= cfg.num_layers:
                raise ValueError(f"adapter {name}: tensor {key} does not fit this model "
                                 f"({cfg.num_layers} layers, modules {', '.join(dims)})")
            fan_in, fan_out = dims[mod]
            want = (r, fan_in) if ab == "lora_A" else (fan_out, r)
            if tuple(t.shape) != want:
                raise ValueError(f"adapter {name}: tensor {key} has shape {list(t.shape)}, this model with rank "
                                 f"{r} needs {list(want)}")
            weights.setdefault((layer, mod), [None, None])[0 if ab == "lora_A" else 1] = t
        if any(a is None or b is None for a, b in weights.values()):
            raise ValueError(f"adapter {name}: a module has only one of lora_A / lora_B")
        h = hashlib.sha256()
        for p in (cfg_path, w_path):
            h.update(p.read_bytes())
        return cls(name, r, scaling, {k: (a, b) for k, (a, b) in weights.items()}, "sha256:" + h.hexdigest())


class LoraTable:
    """The adapters one engine serves, stacked for `K.lora`, and the per-row index buffer."""

    def __init__(self, adapters: list[Adapter], cfg, device, dtype, rows: torch.Tensor | None = None,
                 max_batch: int = 0):
        self.adapters = list(adapters)
        self.names = [a.name for a in adapters]
        n = len(adapters)
        rank = max(a.rank for a in adapters)
        dims = module_dims(cfg)
        self.scaling = torch.tensor([a.scaling for a in adapters], dtype=torch.float32, device=device)
        # per layer, per lean projection: [(A_stack, B_stack, col_offset)] for the modules some adapter targets
        self.layers: list[dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]]] = []
        for i in range(cfg.num_layers):
            groups: dict[str, list] = {}
            for group, mods in GROUPS.items():
                off = 0
                for mod in mods:
                    fan_in, fan_out = dims[mod]
                    if any((i, mod) in a.weights for a in adapters):
                        A = torch.zeros(n, rank, fan_in, dtype=dtype, device=device)
                        B = torch.zeros(n, fan_out, rank, dtype=dtype, device=device)
                        for j, a in enumerate(adapters):
                            if (i, mod) in a.weights:
                                wa, wb = a.weights[(i, mod)]
                                A[j, :a.rank] = wa.to(device=device, dtype=dtype)
                                B[j, :, :a.rank] = wb.to(device=device, dtype=dtype)
                        groups.setdefault(group, []).append((A, B, off))
                    off += fan_out
            self.layers.append(groups)
        # kept across rebuilds (the same storage): captured CUDA graphs read it on replay
        self.rows = rows if rows is not None else torch.full((max(ROWS, max_batch),), -1, dtype=torch.int32, device=device)
        self._step_rows = self.rows   # this step's indices: `rows`, or a larger one-off for a big prefill

    @property
    def nbytes(self) -> int:
        return sum(A.numel() * A.element_size() + B.numel() * B.element_size()
                   for g in self.layers for lst in g.values() for A, B, _ in lst)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def set_rows(self, per_token: list[int], pad_to: int | None = None) -> None:
        """The adapter slot of each token of the step (-1: base), padded with -1 to `pad_to`."""
        t = max(len(per_token), pad_to or 0)
        host = torch.tensor(per_token + [-1] * (t - len(per_token)), dtype=torch.int32)
        if t > self.rows.shape[0]:   # a prefill step larger than the static buffer (never a graph replay:
            self._step_rows = host.to(self.rows.device)   # decode graphs hold at most max_batch rows)
        else:
            self.rows[:t].copy_(host)
            self._step_rows = self.rows

    def apply(self, layer: int, group: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y[T, out] += each row's adapter delta of projection `group` on input x[T, in]; in place."""
        mods = self.layers[layer].get(group)
        if not mods:
            return y
        rows = self._step_rows[:y.shape[0]]
        x = x.contiguous()
        for A, B, off in mods:
            K.lora(y, x, A, B, self.scaling, rows, off)
        return y
