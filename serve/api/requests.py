"""Request bodies at the HTTP edge: OpenAI chat and text completions, feedback, admin.

Requests are validated against what this server can honour: a field the server would
silently ignore with a non-default value (n > 1, tools, logprobs, penalties) is
refused with a message saying what is valid, rather than answered as if it had been
applied. Limits that depend on the answering bundle (prompt + max_tokens within its
context) are checked by the handler once it knows which bundle answers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from slotserve.api.base import ApiModel

# Hard ceiling on max_tokens before we know the bundle; the bundle's context bounds it further.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant")


class StreamOptions(ApiModel):
    include_usage: bool = False


class ContentPart(ApiModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported: "
                             "only {'type': 'text', 'text': ...} parts")
        return self


class ChatMessage(ApiModel):
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


class _Sampling(ApiModel):
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

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        # The OpenAI spec marks these nullable; clients send null to mean "the default".
        return cls.model_fields[info.field_name].default if v is None else v

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

    @field_validator("echo", mode="before")
    @classmethod
    def _null_echo(cls, v):
        return False if v is None else v

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


# ---------------------------------------------------------------- feedback and admin

class FeedbackRequest(ApiModel):
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


class LoadRequest(ApiModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(min_length=1, description="name:version, name@alias or sha256:prefix")
    slot: Literal["candidate"] = "candidate"
    evict_previous: bool = False


class ReasonRequest(ApiModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=2000)


# The rollout spec (POST /admin/rollout) is validated by slotserve.rollout.spec.RolloutSpec,
# which names every invalid field; the HTTP edge only checks that it is a JSON object.


# ---------------------------------------------------------------- tokenizer endpoints (vLLM's shapes)

class TokenizeRequest(ApiModel):
    """POST /tokenize: `prompt` (a string, tokenized as /v1/completions does) or `messages`
    (rendered with the bundle's chat template, as /v1/chat/completions does); exactly one."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True      # messages only
    add_special_tokens: bool | None = None  # prompt only (default true, as completions tokenize)


class DetokenizeRequest(ApiModel):
    """POST /detokenize: token ids back to text with the bundle's tokenizer."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(strict=True, ge=0)]]
