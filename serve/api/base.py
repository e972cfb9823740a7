"""The pydantic base every request and response body at the HTTP edge derives from.

Unknown extra fields are ignored, as the OpenAI clients send new optional fields over
time; fields may be filled by name or alias. Text anywhere in a body must be
encodable UTF-8, so that a lone surrogate is refused with a 400 here instead of
failing in the tokenizer.
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


class ApiModel(BaseModel):
    """Base of every body at the edge: unknown fields ignored, text must be valid Unicode."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_encodable(data)
        return data
