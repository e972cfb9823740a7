"""tool_calls: validation, prompting, parsing and streaming of OpenAI tool calls (pure)."""

from __future__ import annotations

import itertools
import json

import pytest

from slotserve.api import tool_calls as T

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]

# A ChatML template that knows nothing of tools (like SmolLM2's), and a small Hermes-style one
# that renders tools, assistant tool_calls and tool results (written for these tests).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HERMES = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response name=\"{{ m.name }}\">{{ m.content }}"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def ids():
    n = itertools.count()
    return lambda: f"call_{next(n)}"


@pytest.fixture(scope="module")
def tok():
    from slotserve.bundles import demo
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=demo.build_tokenizer(), eos_token=demo.EOS)


# ---------------------------------------------------------------- validation

def test_functions_default_parameters_and_strict():
    fns = T.functions([{"type": "function", "function": {"name": "ping"}}, ADD])
    assert fns[0] == T.Function("ping", "", T.EMPTY_PARAMETERS, False)
    assert fns[1].name == "add" and fns[1].parameters["type"] == "object"
    assert T.functions(None) == ()


@pytest.mark.parametrize("tools, message", [
    ("nope", "tools must be a list"),
    ([{"type": "code_interpreter"}], "only {'type': 'function'"),
    ([{"type": "function"}], "tools[0].function must be an object"),
    ([{"type": "function", "function": {"name": "has space"}}], "1-64 characters"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "1-64 characters"),
    ([WEATHER, WEATHER], "offered twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "strict must be"),
])
def test_functions_refuse_invalid_tools(tools, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace("{", r"\{")):
        T.functions(tools)


def test_tool_choice_defaults_and_forms():
    assert T.resolve_tool_choice(None, None) == T.ToolChoice("none")
    assert T.resolve_tool_choice(TOOLS, None) == T.ToolChoice("auto")
    assert T.resolve_tool_choice(TOOLS, "none") == T.ToolChoice("none")
    assert T.resolve_tool_choice(TOOLS, "required").forced
    named = T.resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named == T.ToolChoice("function", "add") and named.forced
    assert not T.resolve_tool_choice(TOOLS, "auto").forced


@pytest.mark.parametrize("tools, choice, message", [
    (None, "required", "needs tools"),
    ([], "auto", "needs tools"),
    (TOOLS, "always", "tool_choice must be 'none', 'auto', 'required'"),
    (TOOLS, {"type": "function", "function": {"name": "mul"}}, "'mul', which is not among the tools: get_weather, add"),
    (TOOLS, {"type": "function", "function": {}}, "name is missing"),
    (TOOLS, {"type": "allowed_tools"}, "tool_choice must be"),
])
def test_tool_choice_refusals_say_what_is_valid(tools, choice, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        T.resolve_tool_choice(tools, choice)


# ---------------------------------------------------------------- templates and rendering

def test_template_supports_tools():
    assert T.template_supports_tools(HERMES)
    assert T.template_supports_tools("{%- if tools is not none %}x{% endif %}")      # Llama-3.1 style
    assert not T.template_supports_tools(CHATML)
    assert not T.template_supports_tools(None) and not T.template_supports_tools("")
    # the word in text or inside a string literal is not the variable
    assert not T.template_supports_tools("tools are great {{ 'no tools here' }}{{ message.tools_used }}")


def test_template_supports_tools_real_smollm2_template():
    import glob
    paths = glob.glob("/root/.cache/slotserve/SmolLM2*/chat_template.jinja")
    if not paths:
        pytest.skip("the SmolLM2 demo model is not cached here")
    assert not T.template_supports_tools(open(paths[0]).read())


HISTORY = [
    {"role": "user", "content": "Weather in Paris, and 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "5"}]},
]


def test_render_without_template_support_injects_tools_and_converts_turns(tok):
    msgs = T.render_messages(HISTORY, TOOLS, "auto", template_supports_tools=False)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    system = msgs[0]["content"]
    assert system.startswith("# Tools") and '"name": "get_weather"' in system and '"name": "add"' in system
    assert '{"name": "<function name>", "arguments": {<the arguments as JSON>}}' in system
    assert "only when it helps" in system
    assert msgs[2]["content"] == ('{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                  '{"name": "add", "arguments": {"a": 2, "b": 3}}')
    assert msgs[3]["content"] == ("Result of get_weather (call call_a):\n18 C, sunny\n\n"
                                  "Result of add (call call_b):\n5")
    text = tok.apply_chat_template(msgs, chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nResult of get_weather" in text and text.endswith("<|im_start|>assistant\n")
    assert HISTORY[1]["content"] is None                       # the caller's messages are not mutated


def test_render_without_support_merges_into_existing_system_and_names_the_forced_function():
    msgs = T.render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3"}],
                             TOOLS, {"type": "function", "function": {"name": "add"}}, False)
    assert len(msgs) == 2 and msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    assert "You must call the function add now." in msgs[0]["content"]
    assert '"get_weather"' not in msgs[0]["content"]            # only the callable function is listed
    req = T.render_messages([{"role": "user", "content": "x"}], TOOLS, "required", False)
    assert "You must call one of these functions now." in req[0]["content"]


def test_render_with_tool_choice_none_offers_nothing_but_still_converts_history():
    msgs = T.render_messages(HISTORY, TOOLS, "none", False)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert T.template_tools(TOOLS, "none") is None


def test_render_with_template_support_passes_calls_and_results_through(tok):
    msgs = T.render_messages(HISTORY, TOOLS, "auto", template_supports_tools=True)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    call = msgs[1]["tool_calls"][0]
    assert call == {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": {"city": "Paris"}}}
    assert msgs[1]["content"] == "" and msgs[2]["name"] == "get_weather" and msgs[3]["content"] == "5"
    tools = T.template_tools(TOOLS, "auto")
    text = tok.apply_chat_template(msgs, tools=tools, chat_template=HERMES, tokenize=False,
                                   add_generation_prompt=True)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]                     # the tools section
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert '<tool_response name="get_weather">18 C, sunny</tool_response>' in text
    assert [t["function"]["name"] for t in T.template_tools(
        TOOLS, {"type": "function", "function": {"name": "add"}})] == ["add"]


# ---------------------------------------------------------------- parsing whole answers

def test_parse_canonical_call():
    content, calls = T.parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris"}}', new_id=ids())
    assert content is None
    assert calls == [T.ToolCall("call_0", "get_weather", '{"city": "Paris"}')]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_parse_keeps_the_models_argument_text_and_ignores_whitespace_around():
    text = '\n {\n  "name": "add",\n  "arguments": {\n    "a": 1,\n    "b": 2\n  }\n}\n'
    content, calls = T.parse_tool_calls(text, new_id=ids())
    assert content is None and calls[0].arguments == '{\n    "a": 1,\n    "b": 2\n  }'


def test_parse_hermes_blocks_with_text_around():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "a}b\\"c"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>')
    content, calls = T.parse_tool_calls(text, new_id=ids())
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": 'a}b"c'}), ("add", {})]
    assert [c.id for c in calls] == ["call_0", "call_1"]


def test_parse_llama_parameters_form_and_other_key_order_and_string_arguments():
    assert T.parse_tool_calls('{"name": "add", "parameters": {"a": 1}}', new_id=ids())[1] == \
        [T.ToolCall("call_0", "add", '{"a": 1}')]
    assert T.parse_tool_calls('{"arguments": {"a": 1}, "name": "add"}', new_id=ids())[1] == \
        [T.ToolCall("call_0", "add", '{"a": 1}')]
    assert T.parse_tool_calls('{"name": "add", "arguments": "{\\"a\\": 1}"}', new_id=ids())[1] == \
        [T.ToolCall("call_0", "add", '{"a": 1}')]


def test_parse_several_canonical_calls_then_text():
    content, calls = T.parse_tool_calls(
        '{"name": "add", "arguments": {"a": 1}}\n{"name": "add", "arguments": {"a": 2}}\nDone.', new_id=ids())
    assert [c.arguments for c in calls] == ['{"a": 1}', '{"a": 2}'] and content == "Done."


@pytest.mark.parametrize("text", [
    "Paris is the capital of France.",
    '{"city": "Paris", "name": "x"}',                  # JSON, but not a call
    '{"name": "Paris", "country": "France"}',          # a "name" key, but no arguments
    "<tool_call> not json </tool_call>",
    '<tool_call>{"x": 1}</tool_call> after',
    "Use the <tool_call> tag, then JSON.",
    "a <tool_ca",                                       # a partial tag at the very end
])
def test_parse_plain_answers_are_content(text):
    content, calls = T.parse_tool_calls(text, new_id=ids())
    assert calls == [] and content == text.strip()


def test_parse_names_filter_unknown_functions_into_content():
    text = '{"name": "rm_rf", "arguments": {}}'
    assert T.parse_tool_calls(text, names={"add"}) == (text, [])
    assert T.parse_tool_calls(text, names={"rm_rf"}, new_id=ids())[1][0].name == "rm_rf"


def test_parse_a_call_cut_by_max_tokens_keeps_truncated_arguments_and_a_cut_head_is_content():
    _, calls = T.parse_tool_calls('{"name": "add", "arguments": {"a": 1', new_id=ids())
    assert calls == [T.ToolCall("call_0", "add", '{"a": 1')]
    assert T.parse_tool_calls('{"name": "add", "argu', new_id=ids()) == ('{"name": "add", "argu', [])


def test_default_ids_look_like_openais():
    _, calls = T.parse_tool_calls('{"name": "add", "arguments": {}}')
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29 and calls[0].id[5:].isalnum()
    assert T.new_call_id() != T.new_call_id()


def test_finish_reason():
    call = [T.ToolCall("call_0", "add", "{}")]
    assert T.finish_reason("stop", call, T.ToolChoice("auto")) == "tool_calls"
    assert T.finish_reason("stop", call, T.ToolChoice("required")) == "tool_calls"
    assert T.finish_reason("stop", call, T.ToolChoice("function", "add")) == "stop"     # OpenAI's quirk
    assert T.finish_reason("length", call, T.ToolChoice("auto")) == "length"
    assert T.finish_reason("stop", [], T.ToolChoice("auto")) == "stop"


# ---------------------------------------------------------------- streaming

def test_stream_exact_chunks_of_a_call():
    s = T.ToolCallStream(new_id=ids())
    text = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    out = [s.push(text[i:i + 12]) for i in range(0, len(text), 12)] + [s.finish()]
    assert out == [
        [],                                                                  # '{"name": "ge'
        [],                                                                  # 't_weather", '
        [{"tool_calls": [{"index": 0, "id": "call_0", "type": "function",        # '"arguments":'
                          "function": {"name": "get_weather", "arguments": ""}}]}],
        [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "P'}}]}],   # ' {"city": "P'

        [{"tool_calls": [{"index": 0, "function": {"arguments": 'aris", "unit'}}]}],
        [{"tool_calls": [{"index": 0, "function": {"arguments": '": "c"}'}}]}],
        [],
    ]
    pieces = [d["tool_calls"][0]["function"]["arguments"] for chunk in out for d in chunk]
    assert json.loads("".join(pieces)) == {"city": "Paris", "unit": "c"}
    assert s.calls == [T.ToolCall("call_0", "get_weather", '{"city": "Paris", "unit": "c"}')] and s.content == ""


def test_stream_plain_text_goes_out_at_once_except_a_possible_tag_or_trailing_space():
    s = T.ToolCallStream()
    assert s.push("Hello") == [{"content": "Hello"}]
    assert s.push(" world ") == [{"content": " world"}]          # trailing space held
    assert s.push("<tool") == []                                 # could become <tool_call>
    assert s.push("box>") == [{"content": " <toolbox>"}]
    assert s.finish() == []


def test_stream_text_then_hermes_call_then_text():
    s = T.ToolCallStream(new_id=ids())
    deltas = []
    for piece in ["I'll look.\n<tool", '_call>\n{"name": "add", ', '"arguments": {"a": 1}}\n</tool_call>', "\nOk."]:
        deltas += s.push(piece)
    deltas += s.finish()
    assert deltas == [
        {"content": "I'll look."},
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                         "function": {"name": "add", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {"content": "Ok."},
    ]


def test_stream_json_that_is_not_a_call_is_released_as_soon_as_the_first_key_says_so():
    s = T.ToolCallStream()
    assert s.push('{"ci') == [{"content": '{"ci'}]
    assert s.push('ty": 1}') == [{"content": 'ty": 1}'}]


SAMPLES = [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '  {"name":"add","arguments":{"a":1,"b":{"c":[1,"}"]}}}  ',
    'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "x\\"y"}}\n</tool_call>',
    '{"name": "add", "parameters": {"a": 1}}',
    '{"arguments": {"a": 1}, "name": "add"}',
    '{"name": "add", "arguments": "{\\"a\\": 1}"}',
    "plain text with a { brace and <tool_call> mention",
    '{"city": "Paris"}',
    '{"name": "add", "arguments": {"a": 1',
    '{"name": "add"',
    "<tool_call>\n",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_agrees_with_whole_parse_for_every_split(text):
    whole = T.parse_tool_calls(text, new_id=ids())
    for cut in range(len(text) + 1):
        s = T.ToolCallStream(new_id=ids())
        deltas = s.push(text[:cut]) + s.push(text[cut:]) + s.finish()
        assert (s.content or None, s.calls) == whole, cut
        content = "".join(d.get("content", "") for d in deltas)
        assert (content or None) == whole[0]
        args = {}
        for d in deltas:
            for c in d.get("tool_calls", []):
                args[c["index"]] = args.get(c["index"], "") + c["function"]["arguments"]
        assert [args[i] for i in sorted(args)] == [c.arguments for c in whole[1]], cut


def test_stream_one_character_at_a_time():
    for text in SAMPLES:
        s = T.ToolCallStream(new_id=ids())
        for ch in text:
            s.push(ch)
        s.finish()
        assert (s.content or None, s.calls) == T.parse_tool_calls(text, new_id=ids())


# ---------------------------------------------------------------- the openai SDK accepts the shapes

def test_openai_sdk_accepts_the_response_and_chunks():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    content, calls = T.parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "demo:1",
            "choices": [{"index": 0, "finish_reason": T.finish_reason("stop", calls, T.ToolChoice("required")),
                         "message": {"role": "assistant", "content": content,
                                     "tool_calls": [c.to_openai() for c in calls]}}]}
    parsed = ChatCompletion.model_validate(body)
    call = parsed.choices[0].message.tool_calls[0]
    assert parsed.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    s = T.ToolCallStream()
    text = 'Hi.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    deltas = [{"role": "assistant", "content": ""}] + [d for i in range(0, len(text), 7)
                                                       for d in s.push(text[i:i + 7])] + s.finish()
    chunks = [ChatCompletionChunk.model_validate(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "demo:1",
         "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas]
    last = ChatCompletionChunk.model_validate(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "demo:1",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    assert last.choices[0].finish_reason == "tool_calls"
    # what an SDK client accumulates from the chunks
    name, args = None, ""
    for ch in chunks:
        for tc in ch.choices[0].delta.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "add" and json.loads(args) == {"a": 1, "b": 2}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hi."
