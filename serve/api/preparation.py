"""Preparing one request: the answering slot's prompt rendered and checked against its
context, and the sampling parameters resolved (request, then the bundle's defaults).

`prepare` turns an OpenAI-shaped request plus the slot that answers it into a
`Prepared`: the prompt token ids from that bundle's own chat template / tokenizer
(slotserve.replica.bundle_view.BundleView) and the engine parameters. A prompt or max_tokens
that does not fit the bundle's context is a 400 here, before any engine work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from slotserve.api.errors import APIError
from slotserve.replica.bundle_view import BundleView, PromptError

DEFAULT_MAX_TOKENS = 256


@dataclass
class Prepared:
    kind: str                 # "chat" | "completion"
    request: Any
    slot: str
    pinned: bool
    view: BundleView
    prompt_ids: list[int]
    params: dict
    retried_from: str | None = None   # name:version that failed before live answered


def prepare(views: Mapping[str, BundleView], kind: str, req, slot: str, pinned: bool) -> Prepared:
    """`req` ("chat" | "completion") prepared for the bundle in `slot` of `views`."""
    if slot not in views:
        raise APIError(503, f"slot {slot} is empty on this replica", code="not_ready")
    view = views[slot]
    try:
        if kind == "chat":
            ids = view.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            ids = view.encode(req.prompt)
    except PromptError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    if not ids:
        raise APIError(400, "prompt is empty after tokenisation", param="prompt")
    ctx = view.max_model_len
    if len(ids) >= ctx:
        raise APIError(400, f"the prompt is {len(ids)} tokens but {view.ref}'s context is "
                            f"{ctx} tokens; shorten the prompt",
                       param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    limit = req.token_limit()
    if limit is not None and len(ids) + limit > ctx:
        raise APIError(400, f"max_tokens={limit} plus the prompt ({len(ids)} tokens) exceeds "
                            f"{view.ref}'s context of {ctx} tokens; ask for at most "
                            f"{ctx - len(ids)}", param="max_tokens",
                       code="context_length_exceeded")
    if limit is None:
        limit = min(int(view.sampling.get("max_tokens") or DEFAULT_MAX_TOKENS), ctx - len(ids))
    d = view.sampling
    params = {
        "temperature": _pick(req.temperature, d.get("temperature"), 1.0),
        "top_p": _pick(req.top_p, d.get("top_p"), 1.0),
        "top_k": _pick(req.top_k, d.get("top_k"), 0),
        "max_tokens": limit,
        "stop_token_ids": tuple(view.eos_ids),
        "seed": req.seed,
    }
    return Prepared(kind, req, slot, pinned, view, ids, params)


def _pick(req_value, default, fallback):
    if req_value is not None:
        return req_value
    return default if default is not None else fallback
