"""The pydantic bases of every body at the HTTP edge: `ApiModel` (responses) and
`RequestModel` (requests).

A request is refused, not reinterpreted: an unknown field is a 400 naming it (a client
that sends `repetiton_penalty` must learn that nothing applied it), and types are strict
(`"8"` or `true` is not an integer, `"yes"` is not a boolean; an integer is a valid
float). Text anywhere in a body must be encodable UTF-8, so that a lone surrogate is
refused with a 400 here instead of failing in the tokenizer. `FieldError` is a
ValueError naming the request field at fault (the error object's `param`) for the
checks that span fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


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


class FieldError(ValueError):
    """A refusal of request field `param` (a dotted path such as "tools[0].function.name")."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ApiModel(BaseModel):
    """Base of every body at the edge: text must be valid Unicode."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_encodable(data)
        return data


class RequestModel(ApiModel):
    """Base of every request body: unknown fields and loose types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
