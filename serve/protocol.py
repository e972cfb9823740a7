"""The HTTP edge: pydantic models of the OpenAI-compatible API and the admin bodies.

Pydantic lives at the edge and nowhere deeper (DESIGN "Style"). This module is the
one import path for the edge's models; they live by concept in:

* slotserve.api_model     — `ApiModel`, the base: extra fields ignored, valid Unicode only
* slotserve.api_requests  — what a client sends: chat/text completions (refusing fields
                            the server cannot honour), feedback, admin bodies
* slotserve.api_responses — what the server answers, in OpenAI's shapes; ids, timestamps
* slotserve.api_error     — `APIError`, the OpenAI error object, validation errors in words

The app, the handler and the tests import from here, so the split changes no caller.
"""

from __future__ import annotations

from pydantic import ValidationError

from slotserve.api_error import APIError, describe_validation_error, error_body
from slotserve.api_model import ApiModel
from slotserve.api_requests import (MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT, ROLES, ChatCompletionRequest,
                                    ChatMessage, CompletionRequest, ContentPart, FeedbackRequest,
                                    LoadRequest, ReasonRequest, StreamOptions)
from slotserve.api_responses import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                     Completion, CompletionChoice, Delta, FinishReason, ModelCard,
                                     ModelList, ResponseMessage, Usage, now)

__all__ = ["ValidationError", "APIError", "describe_validation_error", "error_body", "ApiModel",
           "MAX_STOP_SEQUENCES", "MAX_TOKENS_LIMIT", "ROLES", "ChatCompletionRequest", "ChatMessage",
           "CompletionRequest", "ContentPart", "FeedbackRequest", "LoadRequest", "ReasonRequest",
           "StreamOptions", "ChatChoice", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk",
           "Completion", "CompletionChoice", "Delta", "FinishReason", "ModelCard", "ModelList",
           "ResponseMessage", "Usage", "now"]
