"""The bundle as a request sees it: `BundleView`, one per loaded bundle.

It holds what answering with one loaded bundle needs — its tokenizer, its own chat
template and system prompt, its context length and sampling defaults — so a rollback
restores the old prompting along with the old weights. A prompt that does not fit the
bundle (its chat template refuses the messages, a token id outside its vocabulary) is a
`PromptError` naming the request field; the HTTP edge answers it with a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class PromptError(ValueError):
    """A prompt the bundle cannot take; `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# A tiny template for bundles whose tokenizer carries none (never the demo bundles).
FALLBACK_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class BundleView:
    """What answering with one bundle needs; built once per loaded bundle (per digest)."""

    ref: str                       # name:version
    name: str
    version: int
    digest: str
    retrieval_index: str           # header value; "none" when the bundle names no index
    max_model_len: int
    tokenizer: Any                 # a transformers tokenizer
    chat_template: str | None
    system_prompt: str | None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    eos_ids: tuple[int, ...] = ()
    path: str = ""                 # the bundle directory (eval set, files)

    @classmethod
    def from_bundle(cls, bundle, tokenizer=None) -> "BundleView":
        """From an opened bundle (path + manifest); loads the tokenizer if not given."""
        m = bundle.manifest
        path = Path(bundle.path)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        serving = json.loads((path / "serving.json").read_text())
        template = _read(path / "prompt" / "template.jinja") or getattr(tokenizer, "chat_template", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_ids = tuple(e for e in ([eos] if isinstance(eos, int) else (eos or [])) if e is not None)
        ri = getattr(m, "retrieval_index", None)
        return cls(ref=f"{m.name}:{m.version}", name=m.name, version=m.version, digest=m.digest,
                   retrieval_index=str(ri) if ri else "none",
                   max_model_len=int(serving.get("max_model_len") or 2048),
                   tokenizer=tokenizer, chat_template=template,
                   system_prompt=_read(path / "prompt" / "system.txt"),
                   sampling=dict(serving.get("sampling") or {}), eos_ids=eos_ids, path=str(path))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        """Messages (role, content and, for tool turns, tool_calls / tool_call_id / name) through
        the bundle's chat template; `tools` and `template_kwargs` become template variables."""
        msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        if self.system_prompt:
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": f"{self.system_prompt}\n\n{msgs[0]['content']}"}
            else:
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
        kwargs = dict(template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, chat_template=self.chat_template or FALLBACK_TEMPLATE,
                tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja raise_exception(...) e.g. roles must alternate
            raise PromptError(f"messages do not fit {self.ref}'s chat template: {exc}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reads(self, variable: str) -> bool:
        """Whether the chat template mentions `variable` (e.g. reasoning_effort)."""
        return variable in (self.chat_template or "")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(t >= vocab for t in prompt):
                raise PromptError(f"token ids must be below the vocabulary size {vocab}", "prompt")
            return list(prompt)
        return list(self.tokenizer(prompt)["input_ids"])

    def headers(self) -> dict[str, str]:
        return {"x-slotserve-bundle": self.ref, "x-slotserve-digest": self.digest,
                "x-slotserve-retrieval-index": self.retrieval_index}


def _read(path: Path) -> str | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return text.strip("\n") or None
