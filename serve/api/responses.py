"""Response bodies at the HTTP edge, in OpenAI's shapes: chat and text completions
(whole and streamed chunks), usage, the model list; plus response ids and timestamps.
"""

from __future__ import annotations

import time
from typing import Literal

from slotserve.api.base import ApiModel


class PromptTokensDetails(ApiModel):
    cached_tokens: int = 0       # prompt tokens whose KV came from the prefix cache


class Usage(ApiModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseMessage(ApiModel):
    role: Literal["assistant"] = "assistant"
    content: str | None                         # None when the answer is only tool calls
    tool_calls: list[dict] | None = None        # [{id, type: "function", function: {name, arguments}}]


class ChatChoice(ApiModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: dict | None = None                # {"content": [{token, logprob, bytes, top_logprobs}]}


class ChatCompletion(ApiModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(ApiModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None        # streamed call pieces, each with its `index`


class ChatChunkChoice(ApiModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: dict | None = None


class ChatCompletionChunk(ApiModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(ApiModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: dict | None = None                # {tokens, token_logprobs, top_logprobs, text_offset}


class Completion(ApiModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(ApiModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slotserve"
    # Extensions: which slot holds it, its digest; None for the routed logical name.
    slot: str | None = None
    digest: str | None = None


class ModelList(ApiModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------- small endpoints (vLLM's shapes)

class TokenizeResponse(ApiModel):
    tokens: list[int]
    count: int
    max_model_len: int        # the answering bundle's context: compare `count` with it
    model: str                # extension: the bundle (name:version) whose tokenizer answered


class DetokenizeResponse(ApiModel):
    prompt: str
    model: str                # extension, as in TokenizeResponse


class VersionResponse(ApiModel):
    version: str              # slotserve's version
    live: str | None = None   # extension: the live bundle on the replica answering (name:version)
    digest: str | None = None # ... and its digest
