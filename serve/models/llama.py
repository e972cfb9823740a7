"""Lean Llama / Mistral / Qwen2 / Qwen3 decoder on `slotserve.kernels`, reading a paged KV cache.

Tokens of a step arrive flattened (`[T]`, no padding). Projections are plain matmuls on
fused weights (q|k|v, gate|up); every other hot op is a kernel: rms_norm (fused with the
residual add), apply_rope, silu_and_mul, store_kv, paged_decode_attention (on the CPU in
fp32, `slotserve.models.cpu_ops` runs bit-identical fused forms of the references). Prefill
attention runs `scaled_dot_product_attention` per sequence on the chunk's own q and the
sequence's cached K/V.

What differs between the four architectures is only data here: Qwen2 has q/k/v biases
(loaded when present, Llama's `attention_bias` too), Qwen3 an RMSNorm over each head of q
and k before rope. Anything else (other activations, rope types, archs) is refused by
`LeanConfig.from_hf` with a reason, and the engine falls back to transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from slotserve import kernels as K
from slotserve.kernels.dispatch import use_triton
from slotserve.models import cpu_ops
from slotserve.models.checkpoint import WeightSpec
from slotserve.models.cpu_ops import cpu_decode_plan, decode_attention_cpu, linear

LEAN_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LeanConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: tuple                        # sorted (key, value) items of the rope parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool                      # Qwen3
    sliding_window: int | None         # active window (None = full attention everywhere)

    @staticmethod
    def from_hf(c) -> "LeanConfig | str":
        """An HF `PretrainedConfig` -> LeanConfig, or a string saying why the lean path can't serve it."""
        arch = (getattr(c, "architectures", None) or ["?"])[0]
        if arch not in LEAN_ARCHS:
            return f"architecture {arch} is not one of the lean model's {', '.join(LEAN_ARCHS)}"
        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            return f"hidden_act={act!r} (lean model implements silu)"
        rope = dict(getattr(c, "rope_parameters", None) or {})
        if not rope:  # transformers < 5 keeps the old fields
            rope = dict(getattr(c, "rope_scaling", None) or {})
            rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope["rope_type"] = rope_type
        if rope_type not in ROPE_TYPES:
            return f"rope_type={rope_type!r} (lean model implements {', '.join(ROPE_TYPES)})"
        if float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            return "partial rotary embedding"
        if getattr(c, "layer_types", None) is not None:
            window = c.sliding_window if "sliding_attention" in c.layer_types else None
        elif arch == "MistralForCausalLM":
            window = getattr(c, "sliding_window", None)
        else:
            window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", False) else None
        heads = c.num_attention_heads
        return LeanConfig(
            arch=arch,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            rms_norm_eps=c.rms_norm_eps,
            rope=tuple(sorted((k, v) for k, v in rope.items() if isinstance(v, (int, float, str)))),
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
        )


def rope_inv_freq(cfg: LeanConfig) -> torch.Tensor:
    """[head_dim/2] fp32 inverse frequencies, computed as transformers does for each rope type."""
    r = dict(cfg.rope)
    d = cfg.head_dim
    inv = 1.0 / (float(r.get("rope_theta", 10000.0)) ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if r["rope_type"] == "linear":
        inv = inv / float(r["factor"])
    elif r["rope_type"] == "llama3":
        factor, lo, hi = float(r["factor"]), float(r["low_freq_factor"]), float(r["high_freq_factor"])
        old = float(r["original_max_position_embeddings"])
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)          # long waves: / factor
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled            # in between: blend
        medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def weight_specs(cfg: LeanConfig) -> list[WeightSpec]:
    specs = [WeightSpec("embed", ("model.embed_tokens.weight",)), WeightSpec("norm", ("model.norm.weight",))]
    lm_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    specs.append(WeightSpec("lm_head", (lm_src,)))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        specs += [
            WeightSpec(f"{i}.in_norm", (p + "input_layernorm.weight",)),
            WeightSpec(f"{i}.post_norm", (p + "post_attention_layernorm.weight",)),
            WeightSpec(f"{i}.qkv", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")),
            WeightSpec(f"{i}.qkv_bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), optional=True),
            WeightSpec(f"{i}.o", (a + "o_proj.weight",)),
            WeightSpec(f"{i}.o_bias", (a + "o_proj.bias",), optional=True),
            WeightSpec(f"{i}.gate_up", (m + "gate_proj.weight", m + "up_proj.weight")),
            WeightSpec(f"{i}.gate_up_bias", (m + "gate_proj.bias", m + "up_proj.bias"), optional=True),
            WeightSpec(f"{i}.down", (m + "down_proj.weight",)),
            WeightSpec(f"{i}.down_bias", (m + "down_proj.bias",), optional=True),
        ]
        if cfg.qk_norm:
            specs += [WeightSpec(f"{i}.q_norm", (a + "q_norm.weight",)),
                      WeightSpec(f"{i}.k_norm", (a + "k_norm.weight",))]
    return specs


@dataclass
class Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor                  # [(Hq + 2 Hk) D, H]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor                    # [H, Hq D]
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor              # [2 I, H]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor                 # [H, I]
    down_bias: torch.Tensor | None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class StepMeta:
    """Attention metadata of one step (tensors on the model's device).

    Rows 0 .. num_decode-1 are decode rows: `block_tables[num_decode, W] int32` and
    `seq_lens[num_decode] int32` (including the new token). The remaining rows are prefill
    chunks: `seqs` lists (q_offset, start, end, block_table[int64]) per sequence, rows
    q_offset .. q_offset + end - start of the flattened tokens, at positions start .. end.
    """

    num_decode: int
    slot_mapping: torch.Tensor                        # [T] int64
    seqs: list = field(default_factory=list)
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    cpu_plan: list | None = None                      # decode on the torch side (see cpu_decode_plan)


class LeanModel:
    def __init__(self, cfg: LeanConfig, weights: dict, max_positions: int, device, dtype):
        self.cfg = cfg
        self.device, self.dtype = torch.device(device), dtype
        self.embed, self.norm, self.lm_head = weights["embed"], weights["norm"], weights["lm_head"]
        names = [f.name for f in Layer.__dataclass_fields__.values()]
        self.layers = [Layer(**{n: weights.get(f"{i}.{n}") for n in names}) for i in range(cfg.num_layers)]
        self.scale = cfg.head_dim ** -0.5
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # Rope table in fp32 (angles like HF); the kernel rounds once to the activations' dtype.
        self.cos_sin = K.build_cos_sin_cache(max_positions, cfg.head_dim, dtype=torch.float32, device=device,
                                             inv_freq=rope_inv_freq(cfg))
        self.kv_layers: list[tuple[torch.Tensor, torch.Tensor]] = []   # set by the engine
        self.lora = None   # models.lora.LoraTable while the engine holds adapters (rows index set per step)

    def weights(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            out += [t for t in vars(layer).values() if t is not None]
        return out

    def replace_weights(self, new: dict[int, torch.Tensor]) -> None:
        """Point every weight attribute holding tensor `t` with id(t) in `new` at new[id(t)]
        (the engine's park/unpark: tied weights stay one object)."""
        for obj, names in [(self, ("embed", "norm", "lm_head"))] + [(la, tuple(vars(la))) for la in self.layers]:
            for name in names:
                t = getattr(obj, name)
                if t is not None and id(t) in new:
                    setattr(obj, name, new[id(t)])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """input_ids[T], positions[T] -> (hidden[T, H], residual[T, H]) before the final norm."""
        cfg = self.cfg
        t = input_ids.shape[0]
        lora = self.lora   # rows of this step set by the runner (LoraTable.set_rows)
        h = F.embedding(input_ids, self.embed)
        # fp32 on the CPU: the kernels' references in fused forms, bit for bit the same
        if cpu_ops.applies(h):
            rms_norm, store_kv, rope = cpu_ops.rms_norm, cpu_ops.store_kv, cpu_ops.rope(self.cos_sin, positions)
        else:
            rms_norm, store_kv = K.rms_norm, K.store_kv
            rope = lambda q, k: K.apply_rope(q, k, positions, self.cos_sin)  # noqa: E731
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                x, residual = rms_norm(h, layer.in_norm, cfg.rms_norm_eps), h
            else:
                x, residual = rms_norm(h, layer.in_norm, cfg.rms_norm_eps, residual)
            qkv = linear(x, layer.qkv, layer.qkv_bias)
            if lora is not None:
                lora.apply(i, "qkv", qkv, x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(t, cfg.num_heads, cfg.head_dim)
            k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:  # Qwen3: RMSNorm over each head before rope
                q = rms_norm(q.reshape(-1, cfg.head_dim), layer.q_norm, cfg.rms_norm_eps).view_as(q)
                k = rms_norm(k.reshape(-1, cfg.head_dim), layer.k_norm, cfg.rms_norm_eps).view_as(k)
            q, k = rope(q, k)
            k_cache, v_cache = self.kv_layers[i]
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            nd = meta.num_decode
            o = self._decode_attention(q[:nd] if nd < t else q, k_cache, v_cache, meta) if nd else None
            if nd < t:
                o_pre = self._prefill_attention(q, k, v, k_cache, v_cache, meta)
                o = o_pre if o is None else torch.cat([o, o_pre])
            o = o.reshape(t, self.q_size)
            h = linear(o, layer.o, layer.o_bias)
            if lora is not None:
                lora.apply(i, "o", h, o)
            x, residual = rms_norm(h, layer.post_norm, cfg.rms_norm_eps, residual)
            gu = linear(x, layer.gate_up, layer.gate_up_bias)
            if lora is not None:
                lora.apply(i, "gate_up", gu, x)
            act = K.silu_and_mul(gu)
            h = linear(act, layer.down, layer.down_bias)
            if lora is not None:
                lora.apply(i, "down", h, act)
        return h, residual

    def _decode_attention(self, q, k_cache, v_cache, meta: StepMeta) -> torch.Tensor:
        if use_triton(q):
            return K.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale)
        if meta.cpu_plan is None:
            meta.cpu_plan = cpu_decode_plan(meta.block_tables.tolist(), meta.seq_lens.tolist(), k_cache.shape[1])
        return decode_attention_cpu(q, k_cache, v_cache, meta.cpu_plan, self.scale)

    def _prefill_attention(self, q, k, v, k_cache, v_cache, meta: StepMeta) -> torch.Tensor:
        cfg = self.cfg
        gqa = cfg.num_heads != cfg.num_kv_heads
        outs = []
        for off, start, end, table in meta.seqs:
            n = end - start
            qi = q[off:off + n].transpose(0, 1)                         # [Hq, n, D]
            if start == 0:   # whole prefix is in this chunk: plain causal attention
                ki, vi = k[off:off + n].transpose(0, 1), v[off:off + n].transpose(0, 1)
                o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True, scale=self.scale,
                                                   enable_gqa=gqa)[0]   # 4-D: CPU flash kernel, not math
            else:            # later chunk: attend to the cached prefix + this chunk (already stored)
                idx = table[: -(-end // k_cache.shape[1])]
                ki = k_cache.index_select(0, idx).flatten(0, 1)[:end].transpose(0, 1)   # either KV layout
                vi = v_cache.index_select(0, idx).flatten(0, 1)[:end].transpose(0, 1)
                pos = torch.arange(start, end, device=q.device)[:, None]
                mask = torch.arange(end, device=q.device)[None, :] <= pos  # [n, end]
                o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], attn_mask=mask, scale=self.scale,
                                                   enable_gqa=gqa)[0]
            outs.append(o.transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the rows that sample: [R, H] -> [R, V] fp32."""
        x, _ = (cpu_ops.rms_norm if cpu_ops.applies(h) else K.rms_norm)(h, self.norm, self.cfg.rms_norm_eps, residual)
        return linear(x, self.lm_head).float()
