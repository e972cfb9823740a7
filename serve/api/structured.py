"""The grammar an OpenAI chat request constrains its answer to (`grammar_for`): pure,
tokenizer-independent, computed once per request at the HTTP edge; the engine compiles it
per tokenizer (slotserve.engine.constraints).

What a grammar allows (decided here; docs/serving.md, "Structured output"):
* every object schema that declares `properties` and says nothing about `additionalProperties`
  is closed (no undeclared keys), strict or not: a 135M model otherwise invents keys until
  max_tokens, and OpenAI's structured outputs never emit undeclared keys either;
* strict (`json_schema.strict: true`, or a function's `strict: true`) is OpenAI's strict mode:
  every declared property is required, and a keyword llguidance cannot enforce is an error;
* non-strict: `required` as written, and unsupported keywords/formats are ignored (lenient);
* whitespace between JSON tokens: at most one newline then at most 16 spaces/tabs per place
  (JSON_WHITESPACE), so compact and indented JSON pass but blank-line loops cannot happen;
* a forced tool call (tool_choice "required" or named) is one canonical call
  {"name": N, "arguments": {...}} (slotserve.api.tool_calls).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from slotserve.api.tool_calls import Function, callable_functions, functions, resolve_tool_choice

# One optional newline, then up to 16 spaces/tabs, wherever JSON allows whitespace. llguidance's
# default (any run) lets small models emit "\n\n\n..." forever; this admits compact JSON and
# pretty-printing up to 4 levels at indent 4 (8 at indent 2).
JSON_WHITESPACE = r"\n?[ \t]{0,16}"

_NAME_CHARS = "a-z, A-Z, 0-9, _ or -"

# Positions in a JSON schema that hold sub-schemas (everything else, e.g. enum/const/default,
# is data and is never rewritten).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
               "propertyNames", "unevaluatedProperties", "additionalItems")


# ---------------------------------------------------------------- request -> grammar (pure)

def _map_schema(schema: Any, fn) -> Any:
    """Apply `fn` to every sub-schema of `schema`, innermost first; returns a new schema."""
    if not isinstance(schema, dict):
        return schema                      # true/false schemas
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _map_schema(v, fn) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS + _SCHEMA_ONE:
        if isinstance(out.get(key), list):                     # incl. draft-4 tuple `items`
            out[key] = [_map_schema(v, fn) for v in out[key]]
        elif key in _SCHEMA_ONE and key in out:
            out[key] = _map_schema(out[key], fn)
    return fn(out)


def closed_schema(schema: Any, *, all_required: bool) -> Any:
    """A copy of `schema` where objects with `properties` but no `additionalProperties` are
    closed; with `all_required`, every declared property is required (OpenAI strict mode)."""
    def close(s: dict) -> dict:
        if isinstance(s.get("properties"), dict):
            s.setdefault("additionalProperties", False)
            if all_required:
                s["required"] = list(s["properties"])
        return s
    return _map_schema(schema, close)


def _nested_refs(schema: Any, prefix: str) -> Any:
    """Local "$ref"s ("#...") re-pointed for `schema` placed at JSON pointer `prefix`."""
    def repoint(s: dict) -> dict:
        ref = s.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and not ref.startswith("#/") and ref != "#":
            raise ValueError(f"$ref {ref!r}: only local JSON pointer refs ('#/...') are supported")
        if isinstance(ref, str) and ref.startswith("#"):
            s["$ref"] = "#" + prefix + ref[1:]
        return s
    return _map_schema(schema, repoint)


def _prepared(schema: dict, *, strict: bool) -> dict:
    """The schema as compiled: closed (and all-required if strict) plus our llguidance options;
    the schema's own top-level "x-guidance" wins over ours."""
    options = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}
    options.update(schema.get("x-guidance") or {})
    return {**closed_schema(schema, all_required=strict), "x-guidance": options}


def _check(grammar: str, what: str) -> str:
    """Compile `grammar` without a tokenizer; a ValueError naming `what` says why it is unusable."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"{what} is not a usable schema: {messages[0].strip()}")
    return grammar


def _response_schema(response_format: dict | None) -> tuple[dict, bool] | None:
    """(schema, strict) the answer must match, or None for free text."""
    if response_format is None:
        return None
    valid = "response_format.type must be 'text', 'json_object' or 'json_schema'"
    if not isinstance(response_format, dict):
        raise ValueError(f"{valid}; got {response_format!r}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, False
    if kind != "json_schema":
        raise ValueError(f"{valid}; got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema must be an object {name, schema, strict}")
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or \
            any(not (c.isascii() and (c.isalnum() or c in "_-")) for c in name):
        raise ValueError(f"response_format.json_schema.name must be 1-64 characters of {_NAME_CHARS}; "
                         f"got {name!r}")
    schema = spec.get("schema", {"type": "object"})      # no schema: any JSON object
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema must be a JSON schema object, "
                         f"got {type(schema).__name__}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError("response_format.json_schema.strict must be true, false or absent")
    return schema, bool(strict)


def _call_schema(fn: Function) -> dict:
    """The schema of one canonical call {"name": N, "arguments": {...}}. The parameters are
    nested under "arguments", so their local refs are re-pointed there."""
    params = _prepared(fn.parameters, strict=fn.strict)
    options = params.pop("x-guidance")
    return {"type": "object",
            "properties": {"name": {"const": fn.name},
                           "arguments": _nested_refs(params, "/properties/arguments")},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": options}


def grammar_for(response_format: dict | None, tools: list[dict] | None, tool_choice: Any) -> str | None:
    """The llguidance grammar an OpenAI chat request constrains its answer to, or None.

    * response_format text/absent -> None; json_object -> any JSON object; json_schema -> it;
    * tool_choice "required" -> one canonical call of one of the tools; a named function ->
      one call of it; "auto"/"none"/absent -> None (free text; with a json response_format and
      "auto": that JSON or one canonical call);
    * a json response_format with a forced call is refused (they cannot both hold).
    Raises ValueError naming the field at fault and what is valid.
    """
    fmt = _response_schema(response_format)
    fns = functions(tools)
    choice = resolve_tool_choice(tools, tool_choice)
    if fmt is not None and choice.forced:
        raise ValueError(f"response_format {response_format.get('type')!r} and tool_choice {tool_choice!r} "
                         "cannot be combined: a forced tool call is not the requested JSON; use "
                         "tool_choice 'auto' or 'none', or response_format {'type': 'text'}")
    # Every schema is checked alone first, so an error names the tool or field at fault.
    alternatives = {}                                  # lark rule name -> %json schema
    if fmt is not None:
        schema, strict = fmt
        alternatives["response"] = _checked(lambda: _prepared(schema, strict=strict),
                                            "response_format.json_schema.schema")
    callable_names = {f.name for f in callable_functions(fns, choice)}
    for i, fn in enumerate(fns):
        if fn.name in callable_names:
            what = f"tools[{i}].function.parameters ({fn.name})"
            _checked(lambda: _prepared(fn.parameters, strict=fn.strict), what)   # the precise reason
            alternatives[f"call_{i}"] = _checked(lambda: _call_schema(fn), what)
    if fmt is None and not choice.forced:
        return None                                    # free text (tools were still checked)
    if list(alternatives) == ["response"]:
        return llguidance.LLMatcher.grammar_from_json_schema(alternatives["response"])
    # Each alternative is its own %json document: its refs resolve inside it, and the lexemes
    # line up (llguidance lexes greedily: a literal head like '{"name": ' in lark would
    # swallow the '{"' a response object starts with).
    lark = f"start: {' | '.join(alternatives)}\n" + "".join(
        f"{rule}: %json {json.dumps(s)}\n" for rule, s in alternatives.items())
    return _check(llguidance.LLMatcher.grammar_from_lark(lark), "the combined grammar")


def _checked(build, what: str) -> dict:
    """Build a prepared schema and compile it alone; ValueError naming `what` if unusable."""
    try:
        schema = build()
    except ValueError as e:
        raise ValueError(f"{what} is not a usable schema: {e}") from None
    _check(llguidance.LLMatcher.grammar_from_json_schema(schema), what)
    return schema
