"""Fused decoding kernels in Triton, each beside a pure-torch reference.

Every op dispatches on its first tensor: Triton on CUDA, the `_ref` elsewhere;
`SLOTSERVE_KERNELS=triton|torch|auto` forces a side (see `dispatch`).
"""

from __future__ import annotations

import torch

from . import activation as _activation
from . import decode_attention as _decode_attention
from . import kv_store as _kv_store
from . import lora as _lora
from . import penalties as _penalties
from . import rms_norm as _rms_norm
from . import rope as _rope
from . import sampling as _sampling
from .activation import silu_and_mul_ref
from .decode_attention import paged_decode_attention_ref
from .dispatch import backend, use_triton
from .kv_store import store_kv_ref
from .lora import lora_ref
from .penalties import PROMPT_SEEN, add_output_tokens, apply_penalties_ref, init_token_row, logprobs_ref, new_token_state
from .rms_norm import rms_norm_ref
from .rope import apply_rope_ref, build_cos_sin_cache
from .sampling import sample_ref

__all__ = [
    "rms_norm", "apply_rope", "silu_and_mul", "store_kv", "paged_decode_attention", "sample",
    "rms_norm_ref", "apply_rope_ref", "silu_and_mul_ref", "store_kv_ref", "paged_decode_attention_ref",
    "sample_ref", "build_cos_sin_cache", "backend", "lora", "lora_ref", "apply_penalties", "apply_penalties_ref",
    "logprobs", "logprobs_ref", "new_token_state", "init_token_row", "add_output_tokens", "PROMPT_SEEN",
]


def _pick(x: torch.Tensor, module, name: str):
    # Module attributes are looked up per call: the Triton side may be reloaded (interpreter).
    if use_triton(x):
        fast = getattr(module, f"{name}_triton", None)
        if fast is not None:
            return fast
    return getattr(module, f"{name}_ref")


def rms_norm(x, weight, eps, residual=None):
    return _pick(x, _rms_norm, "rms_norm")(x, weight, eps, residual)


def apply_rope(q, k, positions, cos_sin_cache):
    return _pick(q, _rope, "apply_rope")(q, k, positions, cos_sin_cache)


def silu_and_mul(x):
    return _pick(x, _activation, "silu_and_mul")(x)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    return _pick(k, _kv_store, "store_kv")(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    return _pick(q, _decode_attention, "paged_decode_attention")(q, k_cache, v_cache, block_tables, seq_lens, scale)


def sample(logits, temperature, top_k, top_p, seeds, offsets=None, *, filtered=True):
    return _pick(logits, _sampling, "sample")(logits, temperature, top_k, top_p, seeds, offsets, filtered=filtered)


def lora(y, x, a_stack, b_stack, scaling, row_adapter, col_offset=0):
    return _pick(x, _lora, "lora")(y, x, a_stack, b_stack, scaling, row_adapter, col_offset)


def apply_penalties(logits, *, temperature=None, min_p=None, token_state=None, state_rows=None, repetition=None,
                    frequency=None, presence=None, bias_ids=None, bias_values=None):
    return _pick(logits, _penalties, "apply_penalties")(
        logits, temperature=temperature, min_p=min_p, token_state=token_state, state_rows=state_rows,
        repetition=repetition, frequency=frequency, presence=presence, bias_ids=bias_ids, bias_values=bias_values)


def logprobs(logits, token_ids, top_n):
    return _pick(logits, _penalties, "logprobs")(logits, token_ids, top_n)  # torch on every device


for _op, _ref in ((rms_norm, rms_norm_ref), (apply_rope, apply_rope_ref), (silu_and_mul, silu_and_mul_ref),
                  (store_kv, store_kv_ref), (paged_decode_attention, paged_decode_attention_ref),
                  (sample, sample_ref), (lora, lora_ref), (apply_penalties, apply_penalties_ref),
                  (logprobs, logprobs_ref)):
    _op.__doc__ = f"Dispatching {_op.__name__}: Triton on CUDA, else `{_ref.__name__}`.\n\n{_ref.__doc__}"
