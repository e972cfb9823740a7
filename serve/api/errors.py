"""Errors at the HTTP edge, in OpenAI's error-object shape.

A request the server refuses or cannot answer raises an `APIError` (status,
message, type, param, code); the routes turn it into
`{"error": {"message", "type", "param", "code"}}` so OpenAI clients report it as they
would one of OpenAI's own. Pydantic's validation errors are reworded here into a
message a client can act on, naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


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
    """(message, param) for the first problems, in words a client can act on; `param` is the
    first problem's field as a dotted path ("messages.0.role", "tools[1].function.name")."""
    errors = exc.errors() if hasattr(exc, "errors") else list(exc)
    if not errors:
        return "invalid request", None
    parts = []
    param = None
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]   # where FastAPI found it
        cause = (err.get("ctx") or {}).get("error")
        if getattr(cause, "param", None):            # a FieldError from a check spanning fields
            loc = loc + [cause.param]
        where = ".".join(loc)
        if param is None and loc:
            param = where
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}", None
        if err.get("type") == "extra_forbidden":
            msg = "unknown field: this server does not know it (see docs/serving.md for the fields it accepts)"
        parts.append(f"{where}: {msg}" if where and not msg.startswith(loc[-1]) else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param
