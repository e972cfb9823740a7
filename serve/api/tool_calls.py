"""OpenAI tools and tool_calls: check what a request offers, tell the model, read its calls back.

Pure functions and one small state machine; no torch, no tokenizer.

    fns = functions(req.tools)                       # validated, ValueError names the bad field
    choice = resolve_tool_choice(req.tools, req.tool_choice)
    msgs = render_messages(req.messages, req.tools, req.tool_choice, template_supports_tools(tpl))
    tokenizer.apply_chat_template(msgs, tools=template_tools(req.tools, req.tool_choice)
                                  if template_supports_tools(tpl) else None, ...)
    content, calls = parse_tool_calls(text, names=choice_names(fns, choice))      # whole answer
    stream = ToolCallStream(names=...); stream.push(piece) -> [delta, ...]; stream.finish()

The canonical call form (what the grammar forces for tool_choice required/named and what a
template without tool support is told to write) is one JSON object per call:

    {"name": "get_weather", "arguments": {"city": "Paris"}}

The parser also reads Hermes/Qwen `<tool_call>{...}</tool_call>` blocks (any number, with text
around them) and Llama-3.1 `{"name": ..., "parameters": {...}}`. `parse_tool_calls` runs the
streaming machine over the whole text, so a streamed answer and a whole answer always agree.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Literal

# ---------------------------------------------------------------- the canonical call form

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")      # OpenAI's rule for function names


def call_prefix(name: str) -> str:
    """The text of a canonical call up to its arguments; the grammar forces exactly this."""
    return '{"name": "' + name + '", "arguments": '


CALL_SUFFIX = "}"


def canonical_call(name: str, arguments: dict) -> str:
    return call_prefix(name) + json.dumps(arguments, ensure_ascii=False) + CALL_SUFFIX


# ---------------------------------------------------------------- what a request offers

EMPTY_PARAMETERS: dict = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    """One offered function (`tools[i].function`)."""

    name: str
    description: str
    parameters: dict            # a JSON schema; {"type": "object", "properties": {}} when absent
    strict: bool


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None     # mode "function": the function the answer must call

    @property
    def forced(self) -> bool:
        """The whole answer must be one call (required or a named function)."""
        return self.mode in ("required", "function")


def functions(tools: list[dict] | None) -> tuple[Function, ...]:
    """Validate `tools` (OpenAI's shape) -> the offered functions, in order."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"{where}: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object with a name (and optional "
                             "description, parameters, strict)")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"{where}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -; "
                             f"got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is offered twice; function names must be unique")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = EMPTY_PARAMETERS
        elif not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object, "
                             f"got {type(params).__name__}")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ValueError(f"{where}.function.description must be a string")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"{where}.function.strict must be true, false or absent")
        out.append(Function(name, desc, params, bool(strict)))
    return tuple(out)


def resolve_tool_choice(tools: list[dict] | None, tool_choice: Any) -> ToolChoice:
    """OpenAI's defaults: "none" without tools, "auto" with them."""
    fns = functions(tools)
    if tool_choice is None:
        return ToolChoice("auto" if fns else "none")
    if tool_choice == "none":
        return ToolChoice("none")
    valid = ("tool_choice must be 'none', 'auto', 'required' or "
             "{'type': 'function', 'function': {'name': NAME}}")
    if tool_choice in ("auto", "required"):
        choice = ToolChoice(tool_choice)
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise ValueError(f"{valid}; the function's name is missing")
        choice = ToolChoice("function", name)
    else:
        raise ValueError(f"{valid}, got {tool_choice!r}")
    if not fns:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools; none were given")
    if choice.name is not None and choice.name not in {f.name for f in fns}:
        raise ValueError(f"tool_choice names function {choice.name!r}, which is not among the tools: "
                         f"{', '.join(f.name for f in fns)}")
    return choice


def callable_functions(fns: Iterable[Function], choice: ToolChoice) -> tuple[Function, ...]:
    """The functions the answer may call under `choice` (none, all, or the named one)."""
    if choice.mode == "none":
        return ()
    return tuple(f for f in fns if choice.name is None or f.name == choice.name)


# ---------------------------------------------------------------- telling the model

# Statements and expressions of a Jinja template, with their string literals removed, so a
# template that merely prints the word "tools" is not mistaken for one that reads the variable.
_JINJA_BLOCK = re.compile(r"\{%.*?%\}|\{\{.*?\}\}", re.S)
_JINJA_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)
_TOOLS_VAR = re.compile(r"(?<![\w.])tools\b")


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the template reads the `tools` variable (Qwen3, Hermes, Llama-3.1 and the like).

    Such templates also render assistant `tool_calls` and `role: "tool"` messages; one that
    never reads `tools` (SmolLM2's, plain ChatML) gets the tools as a system-prompt section.
    """
    if not chat_template:
        return False
    return any(_TOOLS_VAR.search(_JINJA_STRING.sub("''", block))
               for block in _JINJA_BLOCK.findall(chat_template))


def template_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict] | None:
    """What to pass as `apply_chat_template(..., tools=...)` for a template that supports tools:
    None when no tool is offered, only the named one when tool_choice names one (a small model
    calls the right function more often when it sees no others)."""
    fns = callable_functions(functions(tools), resolve_tool_choice(tools, tool_choice))
    if not fns:
        return None
    return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                              "parameters": f.parameters}} for f in fns]


def tools_system_prompt(fns: Iterable[Function], choice: ToolChoice) -> str:
    """The system-prompt section for templates without tool support: the functions and the
    exact call format the parser (and, when forced, the grammar) expects."""
    fns = tuple(fns)
    listing = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters},
                                   ensure_ascii=False) for f in fns)
    if choice.mode == "function":
        rule = f"You must call the function {choice.name} now."
    elif choice.mode == "required":
        rule = "You must call one of these functions now."
    else:
        rule = "Call a function only when it helps to answer; otherwise answer in plain text."
    return ("# Tools\n"
            "You can call these functions (name, description, and parameters as a JSON schema):\n"
            f"{listing}\n"
            "To call a function, reply with only this JSON object and nothing else:\n"
            '{"name": "<function name>", "arguments": {<the arguments as JSON>}}\n'
            f"{rule}")


def _text(content: Any) -> str:
    """Message content as plain text (OpenAI allows a list of {"type": "text", "text": ...} parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _arguments_value(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; HF templates expect a dict (Llama-3.1 applies
    `tojson` to it). Unparseable strings stay strings."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def render_messages(messages: list[dict], tools: list[dict] | None, tool_choice: Any,
                    template_supports_tools: bool) -> list[dict]:
    """OpenAI messages -> messages for `apply_chat_template`.

    With tool support: assistant `tool_calls` (arguments as dicts) and `tool` messages (with
    their function's name added) pass through; pass `template_tools(...)` as `tools=`.
    Without: the offered tools become a section of the first system message (one is inserted
    if there is none), an assistant's calls become its text in the canonical form, and tool
    results become user turns ("Result of NAME (call ID): ..."), consecutive ones merged, so
    templates that only know system/user/assistant still render.
    """
    fns = functions(tools)
    choice = resolve_tool_choice(tools, tool_choice)
    names = {}                                   # tool_call_id -> function name, from earlier turns
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                names[c.get("id")] = fn.get("name")
                calls.append((c.get("id"), fn.get("name"), _arguments_value(fn.get("arguments"))))
            if template_supports_tools:
                out.append({**m, "content": _text(m.get("content")), "tool_calls": [
                    {"id": cid, "type": "function", "function": {"name": n, "arguments": a}}
                    for cid, n, a in calls]})
            else:
                text = "\n".join(canonical_call(n, a) if isinstance(a, dict) else
                                 call_prefix(n) + json.dumps(a) + CALL_SUFFIX for _, n, a in calls)
                head = _text(m.get("content")).strip()
                out.append({"role": "assistant", "content": f"{head}\n{text}" if head else text})
        elif role == "tool":
            cid = m.get("tool_call_id")
            name = m.get("name") or names.get(cid) or "a function"
            if template_supports_tools:
                out.append({**m, "content": _text(m.get("content")), "name": name})
            else:
                line = f"Result of {name} (call {cid}):\n{_text(m.get('content'))}"
                if out and out[-1].get("_tool_result"):
                    out[-1]["content"] += "\n\n" + line
                else:
                    out.append({"role": "user", "content": line, "_tool_result": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_result", None)
    offered = callable_functions(fns, choice)
    if offered and not template_supports_tools:
        section = tools_system_prompt(offered, choice)
        if out and out[0].get("role") in ("system", "developer"):
            head = _text(out[0].get("content"))
            out[0] = {**out[0], "content": f"{head}\n\n{section}" if head else section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


# ---------------------------------------------------------------- reading calls back

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """`call_` + 24 random letters and digits, like OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str              # a JSON string (OpenAI's shape), exactly as the model wrote it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str, *, names: Collection[str] | None = None,
                     new_id=new_call_id) -> tuple[str | None, list[ToolCall]]:
    """A whole answer -> (content or None, calls). Same rules as `ToolCallStream` (it runs it);
    `names`: the callable function names (a call of any other name is content)."""
    s = ToolCallStream(names=names, new_id=new_id)
    s.push(text)
    s.finish()
    return s.content or None, s.calls


def finish_reason(engine_reason: str, calls: list[ToolCall], choice: ToolChoice) -> str:
    """OpenAI's finish_reason for a chat answer: "length" wins (a cut call is still returned,
    with truncated arguments); calls give "tool_calls", except that OpenAI answers "stop" when
    tool_choice named the function."""
    if engine_reason == "length" or not calls:
        return engine_reason
    return "stop" if choice.mode == "function" else "tool_calls"


_WS = " \t\r\n"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_ARG_KEYS = ("arguments", "parameters")


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """Index after the JSON string starting at s[i] == '"'; None if it is not complete yet."""
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
        elif s[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _key(s: str, i: int, expected: tuple[str, ...]):
    """Read a key at s[i]: ("more",) while it could still be one of `expected`, ("other", key)
    / ("other",) when it cannot, ("key", key, end) when it is complete and expected."""
    if i >= len(s):
        return ("more",)
    if s[i] != '"':
        return ("other",)
    end = _string_end(s, i)
    if end is None:
        part = s[i + 1:]
        return ("more",) if any(k.startswith(part) for k in expected) else ("other",)
    key = json.loads(s[i:end])
    return ("key", key, end) if key in expected else ("other", key)


def _head(s: str):
    """Classify a buffer starting with '{' as the head of a call `{"name": N, "arguments"|"parameters": `.

    -> ("more",) | ("no",) not a call | ("whole",) maybe a call in another key order: read the
    whole object | ("call", name, end) with `end` just after the arguments' colon.
    """
    i = _skip_ws(s, 1)
    k = _key(s, i, ("name",) + _ARG_KEYS)
    if k[0] != "key":
        return ("more",) if k[0] == "more" else ("no",)
    if k[1] != "name":
        return ("whole",)
    i = _skip_ws(s, k[2])
    if i >= len(s):
        return ("more",)
    if s[i] != ":":
        return ("no",)
    i = _skip_ws(s, i + 1)
    if i >= len(s):
        return ("more",)
    if s[i] != '"':
        return ("no",)
    end = _string_end(s, i)
    if end is None:
        return ("more",)
    name = json.loads(s[i:end])
    i = _skip_ws(s, end)
    if i >= len(s):
        return ("more",)
    if s[i] != ",":
        return ("whole",)
    i = _skip_ws(s, i + 1)
    k = _key(s, i, _ARG_KEYS)
    if k[0] == "more":
        return ("more",)
    if k[0] == "other":
        return ("whole",)
    i = _skip_ws(s, k[2])
    if i >= len(s):
        return ("more",)
    if s[i] != ":":
        return ("no",)
    return ("call", name, i + 1)


@dataclass
class _Scan:
    """Where a JSON value's scan stands (kept across pushes): nesting depth and string state."""

    depth: int = 0
    in_str: bool = False
    esc: bool = False
    started: bool = False

    def feed(self, s: str, i: int) -> int | None:
        """Scan s[i:]; the index just after the value ends (depth back to 0), else None."""
        for j in range(i, len(s)):
            c = s[j]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 0:
                        return j + 1
            elif c == '"':
                self.in_str = True
                self.started = True
            elif c in "{[":
                self.depth += 1
                self.started = True
            elif c in "}]":
                if self.depth == 0:
                    return j                     # a bare scalar ended at its container's close
                self.depth -= 1
                if self.depth == 0:
                    return j + 1
            elif self.depth == 0 and self.started and c in _WS + ",":
                return j                     # a bare scalar ended
            elif c not in _WS:
                self.started = True
        return None


def _longest_tag_prefix(s: str) -> int:
    """Length of the longest tail of `s` that is a proper prefix of "<tool_call>"."""
    for k in range(min(len(_OPEN) - 1, len(s)), 0, -1):
        if s.endswith(_OPEN[:k]):
            return k
    return 0


class ToolCallStream:
    """Text deltas in, OpenAI `delta` objects out: {"content": ...} or {"tool_calls": [...]}.

    Decision rule (what is buffered, and until when):
    * leading whitespace is dropped (here and after each call);
    * text that does not start with "{" is content, streamed at once, except a tail that could
      still become "<tool_call>" and trailing whitespace, held until the next piece;
    * a "{" starts a possible call, buffered until its head `{"name": "N", "arguments": ` (or
      "parameters") is complete: then the call's first delta goes out (index, id, type,
      function.name, arguments "") and the arguments are streamed raw as they arrive, so the
      pieces concatenate to exactly what the model wrote. As soon as the first key cannot be
      "name"/"arguments"/"parameters", or N is not among `names`, the buffer is content;
    * a call whose keys come in another order is buffered whole, then judged;
    * "<tool_call>" ... "</tool_call>" blocks hold the same JSON; text around them is content;
      after a call, more calls (next index) or content may follow;
    * `finish()` releases anything still held: an unfinished head is content; an unfinished
      call keeps its truncated arguments (as OpenAI streams a call cut by max_tokens).
    With tool_choice required/named the grammar makes the whole output one canonical call, so
    the first delta goes out as soon as the forced head is complete.
    A call whose keys come in another order is rescanned on each push until it closes
    (quadratic in its length, a rare path).
    """

    def __init__(self, *, names: Collection[str] | None = None, new_id=new_call_id):
        self.names = names                 # callable function names; None: any name
        self.new_id = new_id
        self.content = ""                  # all content sent so far
        self.calls_state: list[list[str]] = []     # [id, name, arguments so far] per call
        self._buf = ""                     # text received and not yet decided on
        self._mode = "start"               # start | text | block_start | object | args | tail | block_end
        self._in_block = False             # inside <tool_call> ... </tool_call>
        self._raw = ""                     # text consumed into the current candidate call (content if it is not)
        self._gap = ""                     # whitespace before the last "<tool_call>" (content if no call follows)
        self._scan = _Scan()               # where the current arguments value's scan stands
        self._final = False
        self._out: list[dict] = []

    @property
    def calls(self) -> list[ToolCall]:
        return [ToolCall(i, n, a) for i, n, a in self.calls_state]

    def push(self, text: str) -> list[dict]:
        self._buf += text
        self._run()
        return self._take()

    def finish(self) -> list[dict]:
        self._final = True
        self._run()
        if self._buf:                          # held whitespace or a partial tag at the very end
            self._content(self._buf)
            self._buf = ""
        return self._take()

    # -- emitting

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        if not text:
            return
        self.content += text
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text     # one delta per push
        else:
            self._out.append({"content": text})

    def _call_start(self, name: str) -> None:
        cid = self.new_id()
        self.calls_state.append([cid, name, ""])
        self._out.append({"tool_calls": [{"index": len(self.calls_state) - 1, "id": cid, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})

    def _arguments(self, text: str) -> None:
        if not text:
            return
        self.calls_state[-1][2] += text
        idx = len(self.calls_state) - 1
        last = self._out[-1] if self._out else None
        if last and "tool_calls" in last and last["tool_calls"][0]["index"] == idx \
                and "id" not in last["tool_calls"][0]:
            last["tool_calls"][0]["function"]["arguments"] += text
        else:
            self._out.append({"tool_calls": [{"index": idx, "function": {"arguments": text}}]})

    def _not_a_call(self) -> None:
        """The buffered candidate is content after all; rescan it as text (a block's opening
        tag goes out as content first, or the text scan would find it again)."""
        raw = self._raw
        if self._in_block:
            self._content(self._gap + _OPEN)
            raw = raw[len(self._gap) + len(_OPEN):]
        self._buf = raw + self._buf
        self._raw, self._in_block = "", False
        self._mode = "text"

    # -- the machine: each branch consumes what it can and returns False when it needs more

    def _run(self) -> None:
        while self._step():
            pass

    def _step(self) -> bool:
        b = self._buf
        if self._mode == "start":               # leading whitespace is dropped
            i = _skip_ws(b, 0)
            if i == len(b):
                self._buf = ""
                return False
            self._buf = b[i:]
            self._raw, self._mode = "", ("object" if b[i] == "{" else "text")
            return True
        if self._mode == "block_start":         # just after "<tool_call>"
            i = _skip_ws(b, 0)
            if i == len(b) and not self._final:
                return False
            if i < len(b) and b[i] == "{":
                self._raw, self._buf = self._gap + _OPEN + b[:i], b[i:]
                self._in_block, self._mode = True, "object"
            else:                              # not a call block: the tag is content
                self._content(self._gap + _OPEN)
                self._mode = "text"
            return True
        if self._mode == "text":
            p = b.find(_OPEN)
            if p >= 0:
                before = b[:p].rstrip(_WS)     # whitespace before a call is dropped
                self._content(before)
                self._gap = b[len(before):p]
                self._buf, self._mode = b[p + len(_OPEN):], "block_start"
                return True
            hold = _longest_tag_prefix(b)
            emit = b[:len(b) - hold]
            if not self._final:
                emit = emit.rstrip(_WS)        # trailing whitespace: held (dropped before a tag)
            self._content(emit)
            self._buf = b[len(emit):]
            return False
        if self._mode == "object":
            h = _head(b)
            if h[0] == "more" and not self._final:
                return False
            if h[0] == "call" and (self.names is None or h[1] in self.names):
                self._call_start(h[1])
                self._raw, self._buf = "", b[h[2]:]
                self._scan, self._mode = _Scan(), "args"
                return True
            if h[0] == "whole":
                end = _Scan().feed(b, 0)
                if end is None and not self._final:
                    return False
                call = _whole_call(b[:end] if end else b, self.names)
                if call is not None:
                    self._call_start(call[0])
                    self._arguments(call[1])
                    self._raw, self._buf = "", b[end:]
                    self._mode = "block_end" if self._in_block else "start"
                    return True
            self._not_a_call()
            return True
        if self._mode == "args":
            if not self._scan.started:
                i = _skip_ws(b, 0)
                b = self._buf = b[i:]
                if not b:
                    return False
                if b[0] == '"':                # arguments given as a JSON string: send it decoded
                    end = _string_end(b, 0)
                    if end is None:
                        if self._final:
                            self._arguments(b)
                            self._buf = ""
                        return False
                    self._arguments(json.loads(b[:end]))
                    self._buf, self._scan = b[end:], _Scan(depth=1, started=True)
                    self._mode = "tail"
                    return True
            end = self._scan.feed(b, 0)
            if end is None:
                self._arguments(b)
                self._buf = ""
                return False
            self._arguments(b[:end])
            self._buf, self._scan = b[end:], _Scan(depth=1, started=True)
            self._mode = "tail"
            return True
        if self._mode == "tail":                # the rest of the call object after its arguments
            end = self._scan.feed(b, 0)
            if end is None:
                self._buf = ""
                return False
            self._buf = b[end:]
            self._mode = "block_end" if self._in_block else "start"
            return True
        if self._mode == "block_end":
            i = _skip_ws(b, 0)
            rest = b[i:]
            if _CLOSE.startswith(rest) and not self._final:
                return False
            if rest.startswith(_CLOSE):
                self._buf = rest[len(_CLOSE):]
            else:
                self._buf = rest               # no closing tag: whatever follows is content
            self._in_block, self._mode = False, "start"
            return True
        raise AssertionError(f"unknown mode {self._mode}")


def _whole_call(text: str, names: Collection[str] | None) -> tuple[str, str] | None:
    """(name, arguments JSON string) if `text` is one complete call object in any key order."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    key = next((k for k in _ARG_KEYS if k in obj), None)
    if key is None:
        return None
    args = obj[key]
    if isinstance(args, str):
        return obj["name"], args
    if isinstance(args, dict):
        return obj["name"], json.dumps(args, ensure_ascii=False)
    return None
