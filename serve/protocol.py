"""The HTTP edge: pydantic models of the OpenAI-compatible API and the admin bodies.

Pydantic lives here and nowhere deeper (DESIGN "Style"). Requests are validated
against what this server can honour: a field the server would silently ignore with a
non-default value (n > 1, tools, logprobs, penalties) is refused with a message
saying what is valid, rather than answered as if it had been applied. Unknown extra
fields are ignored, as the OpenAI clients send new optional fields over time.

Limits that depend on the answering bundle (prompt + max_tokens within its context)
are checked by the handler once it knows which bundle answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Hard ceiling on max_tokens before we know the bundle; the bundle's context bounds it further.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant")


# ---------------------------------------------------------------- errors

class APIError(Exception):
    """An error the HTTP edge turns into an OpenAI error object with `status`."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                             else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "invalid_request_error",
                405: "invalid_request_error", 409: "conflict_error",
                413: "invalid_request_error", 415: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable_error",
                504: "timeout_error", 507: "insufficient_storage_error"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe_validation_error(exc: ValidationError | Any) -> tuple[str, str | None]:
    """(message, param) for the first problem, in words a client can act on."""
    errors = exc.errors() if hasattr(exc, "errors") else list(exc)
    if not errors:
        return "invalid request", None
    parts = []
    param = None
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}", None
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


# ---------------------------------------------------------------- shared pieces

def _check_encodable(v: Any, where: str = "body") -> None:
    """JSON may carry lone surrogates ("\\udcff") that no tokenizer can encode: refuse them here."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: text must be valid Unicode (a lone surrogate is not)") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_encodable(x, str(k))
    elif isinstance(v, list):
        for x in v:
            _check_encodable(x, where)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_encodable(data)
        return data


class StreamOptions(_Model):
    include_usage: bool = False


class ContentPart(_Model):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported: "
                             "only {'type': 'text', 'text': ...} parts")
        return self


class ChatMessage(_Model):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"role {v!r} is not supported: valid roles are {list(ROLES)}")
        return v

    @model_validator(mode="after")
    def _content(self):
        if self.tool_calls:
            raise ValueError("tool calls are not supported")
        if self.content is None:
            raise ValueError("content is required (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content or [])


def _check_stop(v):
    if v is None:
        return v
    stops = [v] if isinstance(v, str) else list(v)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must be non-empty strings")
    return v


class _Sampling(_Model):
    """Fields common to chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, lt=1 << 31)  # extension (vLLM-style); 0 = off
    n: int = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _check_stop(v)

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported (one choice per request)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported "
                             "(omit them or send 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported (omit it or send {})")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    def token_limit(self) -> int | None:
        # New clients send max_completion_tokens; it wins when both are present.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI default
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported (n=1, no batches)")
                v = v[0]
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------- responses

class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


FinishReason = Literal["stop", "length"]


class ResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Model):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Model):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slotserve"
    # Extensions: which slot holds it, its digest; None for the routed logical name.
    slot: str | None = None
    digest: str | None = None


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------- feedback and admin

class FeedbackRequest(_Model):
    id: str = Field(min_length=1, max_length=200)
    rating: Union[int, str]
    comment: str | None = Field(default=None, max_length=2000)

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, v):
        if isinstance(v, bool):
            raise ValueError("rating must be 'up', 'down', 1 or -1")
        if v in ("up", 1, "1"):
            return 1
        if v in ("down", -1, "-1"):
            return -1
        raise ValueError("rating must be 'up', 'down', 1 or -1")

    @property
    def thumbs_down(self) -> bool:
        return self.rating == -1


class LoadRequest(_Model):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(min_length=1, description="name:version, name@alias or sha256:prefix")
    slot: Literal["candidate"] = "candidate"
    evict_previous: bool = False


class ReasonRequest(_Model):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=2000)


# The rollout spec (POST /admin/rollout) is validated by slotserve.spec.RolloutSpec,
# which names every invalid field; the HTTP edge only checks that it is a JSON object.
