"""Request bodies at the HTTP edge: OpenAI chat and text completions, feedback, admin.

Requests are validated against what this server can honour: an unknown field, a value of
the wrong JSON type, or a value outside what the server applies is refused with a 400
whose `param` names the field and whose message says what is valid, rather than answered
as if it had been applied (docs/serving.md lists every field). Limits that depend on the
answering bundle (prompt + max_tokens within its context, logit_bias ids within its
vocabulary, template-only fields such as reasoning_effort) are checked by
slotserve.api.preparation once it knows which bundle answers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from slotserve.api.base import FieldError, RequestModel

# Hard ceiling on max_tokens before we know the bundle; the bundle's context bounds it further.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 4
MAX_N = 16                   # choices per request (each is one engine sequence; KV shared by prefix)
MAX_TOP_LOGPROBS = 20        # OpenAI's limit for chat; completions' `logprobs` uses the same
MAX_LOGIT_BIAS = 300         # entries (OpenAI documents no limit; every entry costs a scatter per step)
ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("minimal", "low", "medium", "high")


class StreamOptions(RequestModel):
    include_usage: bool = False


class ContentPart(RequestModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported: "
                             "only {'type': 'text', 'text': ...} parts")
        return self


class FunctionCall(RequestModel):
    name: str
    arguments: str               # JSON text, as OpenAI sends it back


class ToolCallIn(RequestModel):
    """A call an earlier assistant turn made (sent back in `messages`)."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None     # assistant turns
    tool_call_id: str | None = None                # tool turns: which call this answers
    # The openai SDK sends back an assistant message as it received it; these are accepted
    # only empty, since nothing here could use them.
    refusal: None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"role {v!r} is not supported: valid roles are {list(ROLES)}")
        return v

    @field_validator("annotations")
    @classmethod
    def _no_annotations(cls, v):
        if v:
            raise ValueError("annotations are not supported in messages (send none or [])")
        return v

    @model_validator(mode="after")
    def _content(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are only valid on assistant messages, not {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id is only valid on tool messages, not {self.role!r}")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content or [])

    def as_dict(self) -> dict:
        """The message as the prompt renderers take it (slotserve.api.tool_calls)."""
        d: dict[str, Any] = {"role": self.role, "content": self.text() if self.content is not None else None}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


def _check_stop(v):
    if v is None:
        return v
    stops = [v] if isinstance(v, str) else list(v)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must be non-empty strings")
    return v


_TOKEN_ID = re.compile(r"^(0|[1-9][0-9]{0,9})$")


class _Sampling(RequestModel):
    """Fields common to chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, lt=1 << 31)  # extension (vLLM-style); 0 = off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)   # extension (vLLM-style); 0 = off
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)   # extension (HF / vLLM); 1 = off
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        for k, x in v.items():
            if not _TOKEN_ID.match(k):
                raise ValueError(f"keys are token ids (decimal integers as strings, e.g. \"50256\"), got {k!r}")
            if not -100.0 <= x <= 100.0:
                raise ValueError(f"values must be in [-100, 100], got {x} for token {k}")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only valid with stream: true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(x)) for k, x in (self.logit_bias or {}).items())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _field_of(message: str, default: str) -> str:
    """The request field a prototype-style message starts with ("tools[0].function.name must ...")."""
    m = re.match(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*)", message)
    return m.group(1) if m else default


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None      # extension (vLLM): variables for the template
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    _grammar: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _no_echo(cls, data):
        # Said plainly rather than as an unknown field: clients port it from /v1/completions.
        if isinstance(data, dict) and "echo" in data:
            raise FieldError("echo", "echo is a /v1/completions field; chat completions have no echo (the "
                                     "messages are the prompt). For the prompt's logprobs, send the rendered "
                                     "prompt to /v1/completions with echo: true and logprobs")
        return data

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.chat_template_kwargs:
            reserved = sorted({"messages", "tools", "add_generation_prompt", "chat_template", "tokenize",
                               "documents"} & set(self.chat_template_kwargs))
            if reserved:
                raise FieldError("chat_template_kwargs",
                                 f"chat_template_kwargs may not set {reserved}: the server sets them")
        from slotserve.api.structured import grammar_for   # llguidance: loaded on first use
        try:
            self._grammar = grammar_for(self.response_format, self.tools, self.tool_choice)
        except ValueError as e:
            raise FieldError(_field_of(str(e), "response_format"), str(e)) from None
        return self

    @property
    def grammar(self) -> str | None:
        """The llguidance grammar the answer is constrained to (response_format, forced tool call)."""
        return self._grammar

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        # New clients send max_completion_tokens; it wins when both are present.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    # OpenAI's default; 0 only with echo: score and echo the prompt, generate nothing (vLLM's
    # "echo without generation", what eval harnesses send for log-likelihoods)
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

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
                    raise ValueError("only one prompt per request is supported (send n for several "
                                     "choices of one prompt)")
                v = v[0]
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported (insertion needs a fill-in-the-middle model)")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens 0 is only valid with echo: true (the prompt is echoed, "
                                           "with its logprobs if logprobs is set, and nothing is generated); "
                                           "otherwise at least 1")
        if self.best_of not in (None, self.n):
            raise FieldError("best_of", f"best_of must equal n ({self.n}) or be omitted: every "
                                        "generated choice is returned")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs: the echoed prompt's tokens carry logprobs too (OpenAI, vLLM)."""
        return self.logprobs if self.echo else None

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------- feedback and admin

class FeedbackRequest(RequestModel):
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


class LoadRequest(RequestModel):
    bundle: str = Field(min_length=1, description="name:version, name@alias or sha256:prefix")
    slot: Literal["candidate"] = "candidate"
    evict_previous: bool = False


class ReasonRequest(RequestModel):
    reason: str = Field(default="", max_length=2000)


# The rollout spec (POST /admin/rollout) is validated by slotserve.rollout.spec.RolloutSpec,
# which names every invalid field; the HTTP edge only checks that it is a JSON object.


# ---------------------------------------------------------------- tokenizer endpoints (vLLM's shapes)

class TokenizeRequest(RequestModel):
    """POST /tokenize: `prompt` (a string, tokenized as /v1/completions does) or `messages`
    (rendered with the bundle's chat template, as /v1/chat/completions does); exactly one."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True      # messages only
    add_special_tokens: bool | None = None  # prompt only (default true, as completions tokenize)


class DetokenizeRequest(RequestModel):
    """POST /detokenize: token ids back to text with the bundle's tokenizer."""

    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(strict=True, ge=0)]]
