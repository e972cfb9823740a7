"""The bundle as a request sees it, and token ids turned back into text.

`BundleView` holds what answering with one loaded bundle needs — its tokenizer, its own
chat template and system prompt, its context length and sampling defaults — so a
rollback restores the old prompting along with the old weights. `TextStream` is the
incremental detokeniser with stop strings used for every response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from slotserve.api.errors import APIError

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

    def render_chat(self, messages: list[dict]) -> list[int]:
        msgs = [{"role": "system" if m["role"] == "developer" else m["role"],
                 "content": m["content"]} for m in messages]
        if self.system_prompt:
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {"role": "system",
                           "content": f"{self.system_prompt}\n\n{msgs[0]['content']}"}
            else:
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, chat_template=self.chat_template or FALLBACK_TEMPLATE,
                tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raise_exception(...) e.g. roles must alternate
            raise APIError(400, f"messages do not fit {self.ref}'s chat template: {exc}",
                           param="messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(t >= vocab for t in prompt):
                raise APIError(400, f"token ids must be below the vocabulary size {vocab}",
                               param="prompt")
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


class TextStream:
    """Token ids in, text deltas out; stop strings cut the text and end the request.

    Decodes a sliding window (vLLM's prefix/read offsets) so a multi-byte character
    split over tokens is held back until complete, and holds back any tail that could
    still grow into a stop string.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""          # decoded so far (may include a stop string at the end)
        self.sent = 0           # chars of self.text already emitted
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that may be sent now ("" if held back)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                self.stopped = True
            elif not final:
                end -= self._stop_prefix_len()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        if not self.stopped:
            rest = self._decode(self.ids[self._prefix:])
            done = self._decode(self.ids[self._prefix:self._read])
            if len(rest) > len(done):
                self.text += rest[len(done):].rstrip("\ufffd")
        return self._release(final=True)
