"""Loading: an HF model directory, a bundle directory or a hub checkpoint -> an `Engine`.

`load_engine` is what `Engine.from_pretrained` runs: it resolves the bundle (model/,
serving.json, manifest.json), the dtype, EOS ids and lengths, then builds the lean model
with its paged KV pool (and CUDA graphs) or, when the architecture is not supported, the
transformers fallback. A failed load releases every pool claim and tensor it made.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import torch

from slotserve.bundles import hub
from slotserve.engine import kv_cache  # KVCache through its module, so tests can inject an OOM
from slotserve.engine.cuda_graphs import DecodeGraphs, acquire_stream, empty_cache, release_stream
from slotserve.engine.kv_cache import (BLOCK_SIZE, DEFAULT_MAX_BATCH, KVLayout, blocks_for, num_blocks_for_budget,
                                       pool_tokens)
from slotserve.engine.weights import TensorPool, load_weights
from slotserve.kernels.dispatch import backend
from slotserve.models.checkpoint import safetensors_files

log = logging.getLogger("slotserve.engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_engine(cls, path, device="cpu", dtype=None, *, max_model_len=None, max_batch=None,
                kv_cache_tokens=None, tensor_pool: TensorPool | None = None, block_size: int = BLOCK_SIZE,
                max_prefill_tokens: int | None = None, enforce_eager: bool = False,
                model_impl: str = "auto", enable_prefix_caching: bool | None = None):
    """`cls.from_pretrained(...)` (see `Engine.from_pretrained`) -> a `cls` instance."""
    if hub.is_hub(path):   # hub:ORG/REPO[@REV] -> the fetched snapshot (safetensors and configs only)
        path = hub.fetch(path).path
    path = Path(path)
    model_dir, serving, file_sha = _resolve(path)
    safetensors_files(model_dir)  # refuse pickle-only checkpoints up front, naming what is there
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _resolve_dtype(dtype if dtype is not None else serving.get("dtype"), hf_cfg, device)
    eos = _eos_ids(model_dir, hf_cfg)
    max_batch = int(max_batch or serving.get("max_batch") or DEFAULT_MAX_BATCH)
    lean, reason = _model_code(hf_cfg, model_impl, model_dir)
    max_model_len = _max_model_len(max_model_len or serving.get("max_model_len"), hf_cfg, lean)
    if max_prefill_tokens is None:
        max_prefill_tokens = int(serving.get("max_prefill_tokens") or (2048 if device.type == "cuda" else 512))
    if enable_prefix_caching is None:
        enable_prefix_caching = serving.get("enable_prefix_caching", True)
    if not isinstance(enable_prefix_caching, bool):
        raise ValueError(f"enable_prefix_caching (argument or serving.json) must be true or false, "
                         f"got {enable_prefix_caching!r}")
    common = dict(eos_token_ids=eos, max_model_len=max_model_len, max_batch=max_batch, block_size=block_size,
                  model_dir=str(model_dir))
    if lean is None and (path / "adapter" / "adapter_config.json").is_file():
        raise ValueError(f"{path} is a LoRA adapter version; adapters run on the lean model only, and this "
                         f"model needs the transformers fallback ({reason})")
    if lean is None:
        kv_tokens = kv_cache_tokens or serving.get("kv_cache_tokens")   # no pool here: no bytes rule
        return _transformers_engine(cls, model_dir, reason, device, dtype, kv_tokens, max_prefill_tokens, **common)
    eng = _lean_engine(cls, lean, model_dir, file_sha, serving, device, dtype, kv_cache_tokens, tensor_pool,
                       enforce_eager, max_prefill_tokens=max_prefill_tokens,
                       enable_prefix_caching=enable_prefix_caching, **common)
    if (path / "adapter" / "adapter_config.json").is_file():   # an adapter version: base + its adapter
        try:
            name = _bundle_ref(path) or path.name
            eng.add_adapter(name, path / "adapter")
            eng.default_adapter = name
        except BaseException:
            eng.close()
            raise
    return eng


def _bundle_ref(path: Path) -> str | None:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return f"{m['name']}:{m['version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _model_code(hf_cfg, model_impl: str, model_dir: Path):
    """(LeanConfig, None) when the lean model serves this architecture, else (None, why the
    transformers fallback does); `model_impl` may insist on either."""
    from slotserve.models.llama import LeanConfig

    lean = LeanConfig.from_hf(hf_cfg)
    if model_impl not in ("auto", "lean", "transformers"):
        raise ValueError(f"model_impl must be auto, lean or transformers, got {model_impl!r}")
    reason = lean if isinstance(lean, str) else None
    if model_impl == "transformers":
        reason = "model_impl='transformers' requested"
    elif model_impl == "lean" and reason:
        raise ValueError(f"{model_dir}: the lean model cannot serve it: {reason}")
    return (lean, None) if reason is None else (None, reason)


def _max_model_len(asked, hf_cfg, lean) -> int:
    """The context length: `asked` (argument or serving.json), refused beyond what the
    model supports, else the model's own."""
    model_max = _max_positions(hf_cfg)
    if lean is not None and lean.sliding_window:
        # full attention equals sliding-window attention while a sequence fits the window
        model_max = min(model_max, lean.sliding_window)
    if asked is not None and int(asked) > model_max:
        raise ValueError(f"max_model_len={asked} exceeds what this model supports ({model_max} positions"
                         f"{', its sliding window' if lean is not None and lean.sliding_window else ''})")
    return int(asked or model_max)


def _lean_engine(cls, lean, hf_dir: Path, file_sha, serving: dict, device: torch.device, dtype: torch.dtype,
                 kv_cache_tokens, tensor_pool: TensorPool | None, enforce_eager: bool, *, max_batch: int,
                 max_model_len: int, block_size: int, **kw):
    """The lean model on slotserve.kernels: weights (through the pool), the paged KV pool,
    the runner and, on CUDA, the decode graphs. A failure releases all of it."""
    from slotserve.engine.runner import LeanRunner
    from slotserve.models.llama import LeanModel, weight_specs

    owner = object()
    stream = None
    weights = model = kv = runner = None
    try:
        if device.type == "cuda":
            stream = acquire_stream(device)         # this engine's alone
        weights = load_weights(hf_dir, weight_specs(lean), device=device, dtype=dtype,
                               pool=tensor_pool, owner=owner, file_sha256=file_sha)
        model = LeanModel(lean, weights, max_model_len, device, dtype)
        # sized once the weights are in: on CUDA the default is a share of what is free now
        per_token = KVLayout(lean.num_layers, 1, 1, lean.num_kv_heads, lean.head_dim, dtype).bytes_per_token
        kv_tokens = int(kv_cache_tokens or pool_tokens(serving, per_token, max_batch, max_model_len, device))
        layout = KVLayout(lean.num_layers, num_blocks_for_budget(kv_tokens, block_size), block_size,
                          lean.num_kv_heads, lean.head_dim, dtype,
                          head_major=device.type == "cpu" and backend() != "triton")
        kv = kv_cache.KVCache(layout, device)
        model.kv_layers = kv.layers
        runner = LeanRunner(model, block_size, blocks_for(max_model_len, block_size))
        if device.type == "cuda":
            # weights and KV were written on this thread's stream; the engine's own
            # stream (graph capture, steps) must see them finished
            torch.cuda.current_stream(device).synchronize()
            if not enforce_eager:
                runner.graphs = DecodeGraphs.try_capture(runner, max_batch, stream)
        eng = cls(runner, max_batch=max_batch, max_model_len=max_model_len, block_size=block_size,
                  kv_tokens=kv_tokens, kv=kv, tensor_pool=tensor_pool, owner=owner, stream=stream, **kw)
    except BaseException:
        # A failed load (OOM in the KV pool, a missing tensor, ...) must not leak: drop
        # every pool claim this engine made and the tensors it allocated. The frame
        # (kept alive by the traceback) must not pin them either.
        if runner is not None and runner.graphs is not None:
            runner.graphs.release()
        if kv is not None:
            kv.release()
        if tensor_pool is not None:
            tensor_pool.release(owner)
        weights = model = kv = runner = None
        if device.type == "cuda":
            release_stream(stream)
            # the inner frames (load_weights, KVCache, ...) have ended; their locals
            # would keep device tensors alive as long as the exception is referenced
            tb = sys.exc_info()[2]
            if tb is not None and tb.tb_next is not None:
                traceback.clear_frames(tb.tb_next)
            empty_cache()
        raise
    log.info("%s: lean model (%s), %s on %s", hf_dir, lean.arch, dtype, device)
    return eng


def _transformers_engine(cls, hf_dir: Path, reason: str, device: torch.device, dtype: torch.dtype,
                         kv_cache_tokens, max_prefill_tokens: int, *, max_batch: int, max_model_len: int, **kw):
    """Any other causal LM through transformers' own model (slotserve.models.hf); the
    scheduler still budgets KV tokens, by `kv_cache_tokens` or a default."""
    from slotserve.models.hf import HFRunner

    log.warning("%s: serving through transformers (fallback): %s", hf_dir, reason)
    runner = HFRunner(hf_dir, device, dtype)
    kv_tokens = int(kv_cache_tokens or min(max_batch * max_model_len, 1 << 16))
    stream = None
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()   # weights written on this thread's stream
        stream = acquire_stream(device)
    # No chunking on this path: a whole prompt is one forward call.
    return cls(runner, max_batch=max_batch, max_model_len=max_model_len, kv_tokens=kv_tokens,
               max_prefill_tokens=max(max_prefill_tokens, max_model_len), fallback_reason=reason, stream=stream,
               **kw)


def _resolve(path: Path) -> tuple[Path, dict, dict[str, str] | None]:
    """-> (HF model dir, serving.json dict, {weight file name: sha256} from the manifest or None)."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected an HF model dir, a bundle dir, "
                         f"or hub:ORG/REPO[@REVISION] for a hub checkpoint)")
    if not (path / "manifest.json").exists():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has neither config.json (HF model dir) nor manifest.json (bundle)")
        return path, {}, None
    model_dir = path / "model"
    serving = json.loads((path / "serving.json").read_text()) if (path / "serving.json").exists() else {}
    files = json.loads((path / "manifest.json").read_text()).get("files") or {}
    if isinstance(files, list):  # tolerate [{path, sha256}, ...]
        files = {f.get("path"): f for f in files if isinstance(f, dict)}
    sha = {}
    for rel, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else entry
        if isinstance(rel, str) and rel.startswith("model/") and rel.endswith(".safetensors") and digest:
            sha[rel[len("model/"):]] = str(digest).removeprefix("sha256:")
    return model_dir, serving, sha or None


def _resolve_dtype(dtype, hf_cfg, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        cfg_dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = _DTYPES.get(cfg_dtype)
        return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}; valid: auto, {', '.join(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _eos_ids(model_dir: Path, hf_cfg) -> tuple[int, ...]:
    ids: set[int] = set()

    def add(x):
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, (list, tuple)):
            ids.update(int(i) for i in x)

    add(getattr(hf_cfg, "eos_token_id", None))
    gen = model_dir / "generation_config.json"
    if gen.exists():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    return tuple(sorted(ids))


def _max_positions(hf_cfg) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(hf_cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048

