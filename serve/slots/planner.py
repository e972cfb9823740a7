"""Memory planner: does a bundle fit next to what the other slots already hold?

Pure arithmetic plus two readers (safetensors headers, device free memory). The slot
manager calls `estimate()` then `plan()` before every load; a refusal is a
`MemoryPlanError` that names the numbers, because "live and previous are never
squeezed" is only credible if an operator can see why a candidate did not fit.

Free memory is the smaller of
  * what the device reports free (cudaMemGetInfo through torch on CUDA; host MemAvailable on
    CPU) — this already excludes what our slots hold, since they are allocated, and
  * the configured budget minus what our slots hold (a cap anywhere; the only
    meaningful figure on CPU, where host RAM is shared with everything else).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from slotserve.bundles.source import model_weight_files
from slotserve.engine.kv_cache import BLOCK_SIZE, DEFAULT_MAX_BATCH, pool_tokens
from slotserve.engine.sampling_state import token_state_bytes

# Bytes per element by safetensors dtype tag and by serving.json / torch dtype name.
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                   "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# Headroom for activations, allocator fragmentation and sampling buffers: a floor so
# tiny bundles still leave room for a prefill, and a fraction so big ones scale.
HEADROOM_MIN_BYTES = 16 << 20
HEADROOM_FRACTION = 0.10

_UNITS = {"": 1, "b": 1,
          "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
          "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
          "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


class MemoryPlanError(RuntimeError):
    """A load refused by the planner; the message names needed, free and held bytes."""

    def __init__(self, message: str, *, needed: int, free: int, held: Mapping[str, int]):
        super().__init__(message)
        self.needed, self.free, self.held = needed, free, dict(held)


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648. Single letters and *iB are binary, kB/MB/GB decimal."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must be >= 0, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit "
                         "B, K/KiB, M/MiB, G/GiB, T/TiB (binary) or kB, MB, GB, TB (decimal), "
                         "e.g. '2GiB', '512M', '1000000'")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class LoadEstimate:
    weight_bytes: int      # new weight bytes this load allocates (shared ones excluded)
    kv_bytes: int          # KV pool the engine will allocate from serving.json
    headroom_bytes: int    # activations, fragmentation
    shared_bytes: int = 0  # weight bytes already resident in the tensor pool (cost 0)
    sampler_bytes: int = 0  # the penalties' token counts (slotserve.engine.sampling_state)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.headroom_bytes + self.sampler_bytes


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    free_bytes: int | None    # reported by the driver/OS; None when nothing reports
    total_bytes: int | None
    budget_bytes: int | None  # configured cap on what all slots together may hold
    source: str               # "torch" | "host" | "budget"


@dataclass(frozen=True)
class Plan:
    need: LoadEstimate
    device: DeviceMemory
    held: Mapping[str, int] = field(default_factory=dict)
    free_bytes: int = 0       # what was available before this load

    @property
    def free_after_bytes(self) -> int:
        return self.free_bytes - self.need.total_bytes


def available_bytes(device: DeviceMemory, held: Mapping[str, int]) -> int:
    caps = []
    if device.free_bytes is not None:
        caps.append(device.free_bytes)
    if device.budget_bytes is not None:
        caps.append(device.budget_bytes - sum(held.values()))
    if not caps:
        raise ValueError(f"no memory figure for {device.device}: configure a budget "
                         "(memory_budget_bytes / --memory-budget SIZE)")
    return max(0, min(caps))


def plan(need: LoadEstimate, device: DeviceMemory, held: Mapping[str, int],
         headroom: int | None = None) -> Plan:
    """Accept or refuse a load. `held` maps slot name -> bytes it holds (not shared).

    `headroom` overrides `need.headroom_bytes` (e.g. a stricter operator setting).
    """
    if headroom is not None:
        need = LoadEstimate(need.weight_bytes, need.kv_bytes, headroom, need.shared_bytes, need.sampler_bytes)
    free = available_bytes(device, held)
    if need.total_bytes > free:
        held_txt = ", ".join(f"{k}={format_size(v)}" for k, v in held.items()) or "none"
        budget = (f"budget {format_size(device.budget_bytes)}; "
                  if device.budget_bytes is not None else "")
        raise MemoryPlanError(
            f"bundle does not fit on {device.device}: needs {format_size(need.total_bytes)} "
            f"({need.total_bytes} B = weights {format_size(need.weight_bytes)} + KV "
            f"{format_size(need.kv_bytes)} + sampler {format_size(need.sampler_bytes)} + headroom "
            f"{format_size(need.headroom_bytes)}; "
            f"{format_size(need.shared_bytes)} of weights already shared) but only "
            f"{format_size(free)} ({free} B) is free ({budget}held by slots: {held_txt}). "
            "Release a slot (load with evict_previous=True drops previous), shrink "
            "kv_cache_tokens in serving.json, or raise the memory budget.",
            needed=need.total_bytes, free=free, held=held)
    return Plan(need, device, dict(held), free)


def safetensors_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype tag, shape) from a safetensors header, without reading data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def serving_dtype_bytes(serving: dict, config: dict, device: str = "cpu") -> int:
    """Bytes per float element as the engine will hold them (mirrors Engine's dtype rule:
    "auto" is float32 on CPU; on CUDA the config's fp16/bf16, else bf16)."""
    name = serving.get("dtype", "auto")
    if name in (None, "auto"):
        if not str(device).startswith("cuda"):
            return 4
        return 2  # the config's float16/bfloat16, or bfloat16: 2 bytes either way
    if name not in _DTYPE_BYTES:
        raise ValueError(f"serving.json dtype {name!r}: valid are auto, {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def estimate(bundle, *, device: str = "cpu", shared: Callable[[str, str], bool] | None = None,
             headroom_bytes: int | None = None) -> LoadEstimate:
    """Bytes a bundle will cost on `device`: weights at the serving dtype, KV pool, headroom.

    `bundle` is an OpenedBundle (anything with `.path`). `shared(file, tensor)` says
    whether that tensor is already resident in the tensor pool; those bytes are
    reported as shared and excluded from `weight_bytes`.
    """
    root = Path(bundle.path)
    model = root / "model" if (root / "model").is_dir() else root
    config = json.loads((model / "config.json").read_text())
    serving_path = root / "serving.json"
    serving = json.loads(serving_path.read_text()) if serving_path.exists() else {}
    float_bytes = serving_dtype_bytes(serving, config, device)
    new = shared_total = 0
    for st in model_weight_files(model):
        for name, (tag, shape) in safetensors_tensors(st).items():
            numel = 1
            for d in shape:
                numel *= d
            # Floating tensors are cast to the serving dtype; ints keep theirs.
            per = float_bytes if tag in ("F64", "F32", "F16", "BF16") else _ST_DTYPE_BYTES.get(tag, 4)
            if shared is not None and shared(st.name, name):
                shared_total += numel * per
            else:
                new += numel * per
    adapter = root / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():   # an adapter version: its LoRA tensors are always its own (never pooled)
        for _, (_, shape) in safetensors_tensors(adapter).items():
            numel = 1
            for d in shape:
                numel *= d
            new += numel * float_bytes
    kv = kv_tokens(config, serving, device) * kv_bytes_per_token(config, float_bytes)
    if headroom_bytes is None:
        headroom_bytes = max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * (new + shared_total + kv)))
    text = config.get("text_config", config)
    sampler = token_state_bytes(int(serving.get("max_batch") or DEFAULT_MAX_BATCH), int(text.get("vocab_size") or 0))
    return LoadEstimate(new, kv, headroom_bytes, shared_total, sampler)


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """layers × 2 (K and V) × kv_heads × head_dim × dtype size."""
    text = config.get("text_config", config)  # multimodal configs nest the LM
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return text["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes


def kv_tokens(config: dict, serving: dict, device: str = "cpu", block_size: int = BLOCK_SIZE) -> int:
    """KV pool size in tokens by the engine's rule (slotserve.engine.kv_cache.pool_tokens;
    kv_cache_bytes converted at the serving dtype), rounded up to whole blocks like the
    engine. The slot manager hands the result to the engine, so it allocates exactly this."""
    text = config.get("text_config", config)
    per = kv_bytes_per_token(config, serving_dtype_bytes(serving, config, device))
    tokens = pool_tokens(serving, per, int(serving.get("max_batch") or DEFAULT_MAX_BATCH),
                         int(serving.get("max_model_len") or text.get("max_position_embeddings", 2048)), device)
    return -(-tokens // block_size) * block_size


def device_memory(device: str, budget_bytes: int | None = None) -> DeviceMemory:
    """Free memory on `device`, capped by `budget_bytes` when given."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        index = torch.device(dev).index
        index = torch.cuda.current_device() if index is None else index
        free, total = torch.cuda.mem_get_info(index)
        # Memory torch has cached but not handed out is free to us, though the driver
        # counts it as used.
        free += torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return DeviceMemory(dev, free, total, budget_bytes, "torch")
    if dev == "cpu" or dev.startswith("cpu"):
        free, total = _host_memory()
        return DeviceMemory(dev, free, total, budget_bytes, "host" if free else "budget")
    raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def _host_memory() -> tuple[int | None, int | None]:
    """(MemAvailable, MemTotal): available counts reclaimable page cache, unlike MemFree."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None

