"""A PEFT LoRA adapter checked against the base bundle it will run on.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (what
`PeftModel.save_pretrained` writes). Everything is checked at publish, before a byte is
copied, so a bad adapter never reaches a slot: safetensors only (pickle `.bin` refused),
plain LoRA only (no DoRA, no trainable biases, no modules_to_save, no per-module rank or
alpha patterns, no fan_in_fan_out), target modules among the projections the lean model
runs, and every tensor's layer, module, rank and shape against the base's config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from slotserve.bundles.manifest import AdapterInfo, BundleError
from slotserve.bundles.source import safetensors_header

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTN_MODULES + MLP_MODULES
_KEY_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_DTYPES = ("F32", "F16", "BF16")
# PEFT options that change the math beyond `base(x) + scaling * B(A(x))`: refused, naming the key
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D-style) weights",
                "modules_to_save": "modules_to_save (fully trained extra modules)",
                "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
                "layers_to_transform": "layers_to_transform", "megatron_config": "megatron layers"}


def module_shapes(base_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target projection of a Llama-family config."""
    h = int(base_config["hidden_size"])
    heads = int(base_config["num_attention_heads"])
    kv = int(base_config.get("num_key_value_heads") or heads)
    d = int(base_config.get("head_dim") or h // heads)
    i = int(base_config["intermediate_size"])
    return {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def read_adapter(adapter_dir: Path, base_config: Mapping[str, Any], base_digest: str,
                 base_ref: str) -> tuple[AdapterInfo, dict[str, Path]]:
    """Check `adapter_dir` against the base's config; returns the manifest's adapter entry
    and the bundle files (`adapter/<name>` -> path)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise BundleError(f"{adapter_dir} is not a directory; an adapter is a directory with {CONFIG_FILE} "
                          f"and {WEIGHTS_FILE} (PeftModel.save_pretrained writes both)")
    cfg_path, w_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise BundleError(f"{adapter_dir} has no {CONFIG_FILE}; an adapter is what PeftModel.save_pretrained writes")
    if not w_path.is_file():
        pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if pickles:
            raise BundleError(f"{adapter_dir} holds pickle weights ({', '.join(pickles)}); slotserve loads "
                              f"safetensors only: save with model.save_pretrained(dir, safe_serialization=True)")
        raise BundleError(f"{adapter_dir} has no {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise BundleError(f"{cfg_path} must hold a JSON object")
    info = _check_config(cfg, cfg_path, base_digest, base_ref)
    _check_weights(w_path, info, base_config)
    return info, {f"adapter/{CONFIG_FILE}": cfg_path, f"adapter/{WEIGHTS_FILE}": w_path}


def _check_config(cfg: dict, path: Path, base_digest: str, base_ref: str) -> AdapterInfo:
    if cfg.get("peft_type") != "LORA":
        raise BundleError(f"{path}: peft_type must be \"LORA\", got {cfg.get('peft_type')!r}")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise BundleError(f"{path}: r (the rank) must be an integer >= 1, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise BundleError(f"{path}: lora_alpha must be a number > 0, got {alpha!r}")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise BundleError(f"{path}: {key} is set; slotserve serves plain LoRA, not {what}")
    if cfg.get("bias", "none") != "none":
        raise BundleError(f"{path}: bias must be \"none\" (trained biases are not served), got {cfg.get('bias')!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets:
        raise BundleError(f"{path}: target_modules must be a list of module names among {', '.join(TARGETS)} "
                          f"(a regex is not accepted), got {targets!r}")
    bad = sorted(set(targets) - set(TARGETS))
    if bad:
        raise BundleError(f"{path}: target module {bad[0]!r} is not a projection slotserve adapts; "
                          f"valid: {', '.join(TARGETS)}")
    return AdapterInfo(base=base_digest, base_ref=base_ref, rank=r, alpha=float(alpha),
                       target_modules=tuple(sorted(set(targets))), use_rslora=bool(cfg.get("use_rslora", False)))


def _check_weights(path: Path, info: AdapterInfo, base_config: Mapping[str, Any]) -> None:
    header = safetensors_header(path)
    shapes = module_shapes(base_config)
    layers = int(base_config["num_hidden_layers"])
    seen: dict[tuple[int, str], set[str]] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise BundleError(f"{path}: unexpected tensor {key!r}; a LoRA adapter of a Llama-family model holds "
                              "base_model.model.model.layers.N.(self_attn|mlp).MODULE.lora_(A|B).weight")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in info.target_modules:
            raise BundleError(f"{path}: tensor {key} adapts {module}, which is not in target_modules "
                              f"({', '.join(info.target_modules)})")
        if layer >= layers:
            raise BundleError(f"{path}: tensor {key} is for layer {layer}, but the base has {layers} layers")
        if meta.get("dtype") not in _DTYPES:
            raise BundleError(f"{path}: tensor {key} has dtype {meta.get('dtype')}; valid: {', '.join(_DTYPES)}")
        fan_in, fan_out = shapes[module]
        want = [info.rank, fan_in] if ab == "A" else [fan_out, info.rank]
        if list(meta.get("shape", [])) != want:
            raise BundleError(f"{path}: tensor {key} has shape {meta.get('shape')}, the base "
                              f"({info.base_ref}) with rank {info.rank} needs {want}: the adapter was trained "
                              "for another base or another rank")
        seen.setdefault((layer, module), set()).add(ab)
    if not seen:
        raise BundleError(f"{path} holds no LoRA tensors")
    half = sorted(f"layer {la} {mod}" for (la, mod), ab in seen.items() if ab != {"A", "B"})
    if half:
        raise BundleError(f"{path}: {half[0]} has only one of lora_A / lora_B; both are needed")
