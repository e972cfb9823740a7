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
from slotserve.engine.cuda_graphs import empty_cache
from slotserve.engine.kv_cache import KVLayout, blocks_for, num_blocks_for_budget
from slotserve.engine.weights import TensorPool, load_weights
from slotserve.kernels.dispatch import backend
from slotserve.models.checkpoint import safetensors_files

log = logging.getLogger("slotserve.engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_engine(cls, path, device="cpu", dtype=None, *, max_model_len=None, max_batch=None,
                kv_cache_tokens=None, tensor_pool: TensorPool | None = None, block_size: int = 16,
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
    max_batch = int(max_batch or serving.get("max_batch") or 64)

    from slotserve.engine.runner import LeanRunner
    from slotserve.models.llama import LeanConfig, LeanModel, weight_specs

    lean = LeanConfig.from_hf(hf_cfg)
    if model_impl not in ("auto", "lean", "transformers"):
        raise ValueError(f"model_impl must be auto, lean or transformers, got {model_impl!r}")
    reason = lean if isinstance(lean, str) else None
    if model_impl == "transformers":
        reason = "model_impl='transformers' requested"
    elif model_impl == "lean" and reason:
        raise ValueError(f"{model_dir}: the lean model cannot serve it: {reason}")
    model_max = _max_positions(hf_cfg)
    if reason is None and lean.sliding_window:
        # full attention equals sliding-window attention while a sequence fits the window
        model_max = min(model_max, lean.sliding_window)
    req_len = max_model_len or serving.get("max_model_len")
    if req_len is not None and int(req_len) > model_max:
        raise ValueError(f"max_model_len={req_len} exceeds what this model supports ({model_max} positions"
                         f"{', its sliding window' if reason is None and lean.sliding_window else ''})")
    max_model_len = int(req_len or model_max)
    if max_prefill_tokens is None:
        max_prefill_tokens = int(serving.get("max_prefill_tokens") or (2048 if device.type == "cuda" else 512))
    if enable_prefix_caching is None:
        enable_prefix_caching = serving.get("enable_prefix_caching", True)
    if not isinstance(enable_prefix_caching, bool):
        raise ValueError(f"enable_prefix_caching (argument or serving.json) must be true or false, "
                         f"got {enable_prefix_caching!r}")

    if reason is None:
        owner = object()
        stream = None
        weights = model = kv = runner = None
        try:
            if device.type == "cuda":
                from slotserve.engine.cuda_graphs import acquire_stream
                stream = acquire_stream(device)         # this engine's alone
            weights = load_weights(model_dir, weight_specs(lean), device=device, dtype=dtype,
                                   pool=tensor_pool, owner=owner, file_sha256=file_sha)
            model = LeanModel(lean, weights, max_model_len, device, dtype)
            per_token = KVLayout(lean.num_layers, 1, 1, lean.num_kv_heads, lean.head_dim, dtype).bytes_per_token
            kv_tokens = _kv_tokens(kv_cache_tokens, serving, per_token, max_batch, max_model_len, device)
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
                    from slotserve.engine.cuda_graphs import DecodeGraphs
                    runner.graphs = DecodeGraphs.try_capture(runner, max_batch, stream)
            eng = cls(runner, eos_token_ids=eos, max_model_len=max_model_len, max_batch=max_batch,
                      kv_tokens=kv_tokens, block_size=block_size, max_prefill_tokens=max_prefill_tokens,
                      kv=kv, tensor_pool=tensor_pool, owner=owner, model_dir=str(model_dir), stream=stream,
                      enable_prefix_caching=enable_prefix_caching)
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
                from slotserve.engine.cuda_graphs import release_stream
                release_stream(stream)
                # the inner frames (load_weights, KVCache, ...) have ended; their locals
                # would keep device tensors alive as long as the exception is referenced
                tb = sys.exc_info()[2]
                if tb is not None and tb.tb_next is not None:
                    traceback.clear_frames(tb.tb_next)
                empty_cache()
            raise
        log.info("%s: lean model (%s), %s on %s", model_dir, lean.arch, dtype, device)
        return eng

    from slotserve.models.hf import HFRunner

    log.warning("%s: serving through transformers (fallback): %s", model_dir, reason)
    runner = HFRunner(model_dir, device, dtype)
    kv_tokens = int(kv_cache_tokens or serving.get("kv_cache_tokens") or min(max_batch * max_model_len, 1 << 16))
    stream = None
    if device.type == "cuda":
        from slotserve.engine.cuda_graphs import acquire_stream

        torch.cuda.current_stream(device).synchronize()   # weights written on this thread's stream
        stream = acquire_stream(device)
    # No chunking on this path: a whole prompt is one forward call.
    return cls(runner, eos_token_ids=eos, max_model_len=max_model_len, max_batch=max_batch,
               kv_tokens=kv_tokens, block_size=block_size, max_prefill_tokens=max(max_prefill_tokens, max_model_len),
               model_dir=str(model_dir), fallback_reason=reason, stream=stream)


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


def _kv_tokens(explicit, serving: dict, per_token: int, max_batch: int, max_model_len: int,
               device: torch.device) -> int:
    if explicit:
        return int(explicit)
    if serving.get("kv_cache_tokens"):
        return int(serving["kv_cache_tokens"])
    if serving.get("kv_cache_bytes"):
        return max(1, int(serving["kv_cache_bytes"]) // per_token)
    # Default: every slot at full length, capped by a memory budget (the slot layer's
    # planner normally sets kv_cache_tokens explicitly).
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.3)
    else:
        budget = 512 << 20
    return max(min(max_batch * max_model_len, budget // per_token), min(max_model_len, 1 << 20))
