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
        ids = _render_chat(view, req) if kind == "chat" else view.encode(req.prompt)
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
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": _pick(req.repetition_penalty, d.get("repetition_penalty"), 1.0),
        "min_p": _pick(req.min_p, d.get("min_p"), 0.0),
        "logit_bias": req.logit_bias_pairs(),
        "logprobs": req.num_logprobs,
        "prompt_logprobs": req.num_prompt_logprobs if kind == "completion" else None,
        "grammar": req.grammar if kind == "chat" else None,
    }
    vocab = len(view.tokenizer)
    bad = [t for t, _ in params["logit_bias"] if t >= vocab]
    if bad:
        raise APIError(400, f"logit_bias: token ids {bad[:5]} are outside {view.ref}'s vocabulary "
                            f"[0, {vocab})", param="logit_bias")
    return Prepared(kind, req, slot, pinned, view, ids, params)


def _render_chat(view: BundleView, req) -> list[int]:
    """The chat prompt: tools told to the model through the bundle's own template when it
    reads `tools`, else as a system section (slotserve.api.tool_calls); template variables
    from chat_template_kwargs and reasoning_effort."""
    from slotserve.api.tool_calls import render_messages, template_supports_tools, template_tools
    supports = template_supports_tools(view.chat_template)
    msgs = render_messages([m.as_dict() for m in req.messages], req.tools, req.tool_choice, supports)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        # Passed only to a template that reads it (gpt-oss style); elsewhere nothing would
        # apply it, so it is refused rather than ignored.
        if not view.reads("reasoning_effort"):
            raise APIError(400, f"reasoning_effort: {view.ref}'s chat template does not read it, so it "
                                "would have no effect; omit it", param="reasoning_effort")
        kwargs["reasoning_effort"] = req.reasoning_effort
    tools = template_tools(req.tools, req.tool_choice) if supports else None
    return view.render_chat(msgs, tools=tools, template_kwargs=kwargs)


def _pick(req_value, default, fallback):
    if req_value is not None:
        return req_value
    return default if default is not None else fallback
