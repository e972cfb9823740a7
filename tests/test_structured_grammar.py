"""grammar: request -> grammar, matchers, EOS, the LRU, and masks on batched logits.

Uses the demo's byte-level tokenizer (vocab 512, EOS ids 2 and 4 like the demo bundle's
generation_config), so these run in a few seconds with no model.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import BaseModel, Field

from slotserve.api import structured as S
from slotserve.engine import constraints as C

EOS_IDS = (2, 4)        # <|eos|>, <|im_end|>


@pytest.fixture(scope="module")
def tok():
    from slotserve.bundles import demo
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=demo.build_tokenizer(), eos_token=demo.EOS)


@pytest.fixture(scope="module")
def masker(tok):
    return C.TokenMasker(tok, eos_token_ids=EOS_IDS)


def run(masker, tok, grammar, text):
    """Feed `text` token by token -> (all consumed, accepting, matcher)."""
    m = masker.matcher(grammar)
    ok = all(m.consume(t) for t in tok.encode(text, add_special_tokens=False))
    return ok, ok and m.is_accepting(), m


def accepts(masker, tok, grammar, text) -> bool:
    return run(masker, tok, grammar, text)[1]


def schema_format(schema, strict=None, name="out"):
    spec = {"name": name, "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "strict": True,
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]


# ---------------------------------------------------------------- grammar_for

@pytest.mark.parametrize("rf, tools, choice", [
    (None, None, None), ({"type": "text"}, None, None), (None, TOOLS, "auto"), (None, TOOLS, None),
    (None, TOOLS, "none"), ({"type": "text"}, TOOLS, "none"),
])
def test_free_text_has_no_grammar(rf, tools, choice):
    assert S.grammar_for(rf, tools, choice) is None


def test_json_object_is_any_object(masker, tok):
    g = S.grammar_for({"type": "json_object"}, None, None)
    assert accepts(masker, tok, g, '{"a": [1, {"b": null}], "c": "d"}')
    assert accepts(masker, tok, g, "{}")
    for text in ("[1, 2]", '"x"', "12", '{"a": 1} trailing'):
        assert not accepts(masker, tok, g, text), text


def test_whitespace_is_bounded(masker, tok):
    g = S.grammar_for({"type": "json_object"}, None, None)
    assert accepts(masker, tok, g, '{\n  "a": {\n    "b": 1\n  }\n}')        # indented
    assert accepts(masker, tok, g, '{"a":1}')                               # compact
    assert not accepts(masker, tok, g, '{\n\n"a": 1}')                       # blank lines
    assert not accepts(masker, tok, g, '{' + " " * 17 + '"a": 1}')           # > 16 spaces


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)
    nickname: str | None = None


def test_strict_schema_requires_every_property_and_no_other(masker, tok):
    g = S.grammar_for(schema_format(City.model_json_schema(), strict=True), None, None)
    full = '{"name": "Paris", "country": "France", "population_millions": 2, "nickname": null}'
    assert accepts(masker, tok, g, full)
    assert City.model_validate_json(full).name == "Paris"
    assert not accepts(masker, tok, g, '{"name": "Paris", "country": "France", "population_millions": 2}')
    assert not accepts(masker, tok, g, full[:-1] + ', "extra": 1}')
    assert not accepts(masker, tok, g, full.replace(": 2,", ": 200,"))           # maximum 100
    assert not accepts(masker, tok, g, full.replace('"Paris"', '"' + "P" * 41 + '"'))   # maxLength 40


def test_non_strict_schema_keeps_required_as_written_but_is_still_closed(masker, tok):
    g = S.grammar_for(schema_format(City.model_json_schema()), None, None)
    assert accepts(masker, tok, g, '{"name": "Paris", "country": "France", "population_millions": 2}')
    assert not accepts(masker, tok, g, '{"name": "Paris", "country": "France", "population_millions": 2, "x": 1}')
    assert not accepts(masker, tok, g, '{"name": "Paris"}')                      # required still holds
    opened = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}
    assert accepts(masker, tok, S.grammar_for(schema_format(opened), None, None), '{"a": 1, "zz": [true]}')


def test_non_strict_is_lenient_and_strict_is_not():
    weird = {"type": "object", "properties": {"d": {"type": "string", "format": "weird-format"}}}
    assert S.grammar_for(schema_format(weird), None, None)
    with pytest.raises(ValueError, match=r"response_format.json_schema.schema is not a usable schema: "
                                         r"Unknown format: weird-format"):
        S.grammar_for(schema_format(weird, strict=True), None, None)


@pytest.mark.parametrize("schema, message", [
    ({"type": "foo"}, "Invalid type: foo"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
    ({"$ref": "#/$defs/missing"}, "does not exist"),
    ({"type": "string", "pattern": "(?=a)"}, "look-around"),
])
def test_unusable_schemas_surface_llguidances_reason(schema, message):
    with pytest.raises(ValueError, match=r"response_format\.json_schema\.schema is not a usable schema") as e:
        S.grammar_for(schema_format(schema), None, None)
    assert message in str(e.value)


@pytest.mark.parametrize("rf, message", [
    ({"type": "xml"}, "response_format.type must be 'text', 'json_object' or 'json_schema'; got 'xml'"),
    ("json", "response_format.type must be"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name must be 1-64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name must be 1-64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}, "schema must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": 1}}, "strict must be true"),
])
def test_response_format_refusals_say_what_is_valid(rf, message):
    with pytest.raises(ValueError) as e:
        S.grammar_for(rf, None, None)
    assert message in str(e.value)


def test_json_schema_without_schema_is_any_object(masker, tok):
    g = S.grammar_for({"type": "json_schema", "json_schema": {"name": "free"}}, None, None)
    assert accepts(masker, tok, g, '{"k": 1}') and not accepts(masker, tok, g, "[]")


@pytest.mark.parametrize("rf", [{"type": "json_object"}, schema_format({"type": "object"})])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_json_response_with_a_forced_call_is_refused_naming_both(rf, choice):
    with pytest.raises(ValueError) as e:
        S.grammar_for(rf, TOOLS, choice)
    assert "response_format" in str(e.value) and "tool_choice" in str(e.value)


def test_required_allows_exactly_one_call_of_any_tool(masker, tok):
    g = S.grammar_for(None, TOOLS, "required")
    assert accepts(masker, tok, g, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}')
    assert accepts(masker, tok, g, '{\n  "name": "add",\n  "arguments": {"a": 1, "b": -2}\n}')
    assert not accepts(masker, tok, g, '{"name": "add", "arguments": {"a": 1}}')             # strict: b required
    assert not accepts(masker, tok, g, '{"name": "get_weather", "arguments": {"unit": "c"}}')  # city required
    assert not accepts(masker, tok, g, '{"name": "mul", "arguments": {}}')
    assert not accepts(masker, tok, g, '{"arguments": {"a": 1, "b": 2}, "name": "add"}')     # canonical order
    assert not accepts(masker, tok, g, "Sure! " + '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    _, _, m = run(masker, tok, g, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert m.is_finished()


def test_named_choice_allows_only_that_function(masker, tok):
    g = S.grammar_for(None, TOOLS, {"type": "function", "function": {"name": "add"}})
    assert accepts(masker, tok, g, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert not accepts(masker, tok, g, '{"name": "get_weather", "arguments": {"city": "x"}}')
    # the name is forced: after '{"' only the grammar's bytes may follow
    _, _, m = run(masker, tok, g, '{"na')
    assert tok.decode(m.allowed_mask().nonzero().flatten().tolist()).startswith("m")


def test_auto_with_a_json_response_allows_the_response_or_a_call(masker, tok):
    g = S.grammar_for(schema_format(City.model_json_schema(), strict=True), TOOLS, "auto")
    assert accepts(masker, tok, g, '{"name": "Rome", "country": "Italy", "population_millions": 3, "nickname": null}')
    assert accepts(masker, tok, g, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert not accepts(masker, tok, g, "Rome is in Italy.")


def test_tool_parameters_with_refs_still_resolve_under_arguments(masker, tok):
    class Point(BaseModel):
        x: int
        y: int

    class Segment(BaseModel):
        start: Point
        end: Point

    tool = {"type": "function", "function": {"name": "draw", "parameters": Segment.model_json_schema()}}
    assert "$defs" in tool["function"]["parameters"]
    g = S.grammar_for(None, [tool], "required")
    args = '{"start": {"x": 1, "y": 2}, "end": {"x": 3, "y": 4}}'
    assert accepts(masker, tok, g, '{"name": "draw", "arguments": ' + args + "}")
    assert Segment.model_validate_json(args).end.y == 4
    recursive = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}}}}}
    g = S.grammar_for(None, [recursive], "required")
    assert accepts(masker, tok, g, '{"name": "tree", "arguments": {"kids": [{"kids": []}]}}')


def test_unusable_tool_parameters_name_the_tool():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 3, "maximum": 1}}, "required": ["n"]}}}
    with pytest.raises(ValueError, match=r"tools\[1\]\.function\.parameters \(f\) is not a usable schema: "
                                         r"Unsatisfiable schema: required property 'n' is unsatisfiable"):
        S.grammar_for(None, [WEATHER, bad], "auto")
    # a tool that is not callable (tool_choice "none") is not compiled
    assert S.grammar_for(None, [WEATHER, bad], "none") is None


def test_closed_schema_rewrites_sub_schemas_only():
    s = {"type": "object",
         "properties": {"properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
                        "list": {"type": "array", "items": {"type": "object", "properties": {"b": {}}}},
                        "either": {"anyOf": [{"type": "object", "properties": {"c": {}}}, {"type": "null"}]},
                        "fixed": {"const": {"properties": {"x": 1}}}},
         "$defs": {"D": {"type": "object", "properties": {"d": {}}, "additionalProperties": True}}}
    out = S.closed_schema(s, all_required=True)
    assert out["additionalProperties"] is False and out["required"] == ["properties", "list", "either", "fixed"]
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert out["properties"]["properties"]["required"] == ["a"]
    assert out["properties"]["list"]["items"]["additionalProperties"] is False
    assert out["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert out["properties"]["fixed"] == {"const": {"properties": {"x": 1}}}         # data, untouched
    assert out["$defs"]["D"]["additionalProperties"] is True                          # explicit wins
    assert "additionalProperties" not in s                                            # input untouched
    assert "required" not in S.closed_schema(s, all_required=False)


# ---------------------------------------------------------------- matchers and EOS

def test_a_finished_grammar_allows_exactly_the_eos_ids(masker, tok):
    g = S.grammar_for(schema_format({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"]}), None, None)
    ok, accepting, m = run(masker, tok, g, '{"a": 12}')
    assert ok and accepting and m.is_finished()
    allowed = m.allowed_mask()
    assert allowed.shape == (masker.vocab_size,) and allowed.nonzero().flatten().tolist() == list(EOS_IDS)
    assert m.consume(EOS_IDS[1]) and m.error is None


def test_accepting_but_not_finished_allows_eos_and_more(masker, tok):
    g = S.grammar_for(schema_format({"type": "integer"}), None, None)
    ok, accepting, m = run(masker, tok, g, "12")
    assert ok and accepting and not m.is_finished()
    allowed = m.allowed_mask()
    assert allowed[list(EOS_IDS)].all() and allowed[tok.convert_tokens_to_ids("3")]


def test_eos_is_refused_before_the_grammar_is_complete(masker, tok):
    g = S.grammar_for({"type": "json_object"}, None, None)
    _, _, m = run(masker, tok, g, '{"a": ')
    assert not m.allowed_mask()[list(EOS_IDS)].any()
    assert not m.consume(EOS_IDS[0]) and m.error


def test_a_forbidden_token_puts_the_matcher_in_error(masker, tok):
    m = masker.matcher(S.grammar_for({"type": "json_object"}, None, None))
    assert not m.consume(tok.convert_tokens_to_ids("x"))
    assert m.error.startswith("Parser Error") and "\n" not in m.error
    assert m.is_finished()                     # llguidance: stopped in the error state too


def test_rollback_restores_the_earlier_state(masker, tok):
    g = S.grammar_for({"type": "json_object"}, None, None)
    m = masker.matcher(g)
    toks = tok.encode('{"ab": 1', add_special_tokens=False)
    assert all(m.consume(t) for t in toks[:2])
    before = m.allowed_mask().clone()
    assert all(m.consume(t) for t in toks[2:])
    assert m.rollback(len(toks) - 2)
    assert torch.equal(m.allowed_mask(), before)
    assert m.reset() and torch.equal(m.allowed_mask(), masker.matcher(g).allowed_mask())


def test_forced_tokens_are_the_jump_forward(masker, tok):
    g = S.grammar_for(None, [ADD], "required")
    m = masker.matcher(g)
    assert all(m.consume(t) for t in tok.encode('{"', add_special_tokens=False))
    assert tok.decode(m.forced_tokens()).startswith('name"')        # the only key allowed first


def test_matchers_of_one_grammar_are_independent(masker, tok):
    g = S.grammar_for({"type": "json_object"}, None, None)
    a, b = masker.matcher(g), masker.matcher(g)
    assert a.consume(tok.encode("{", add_special_tokens=False)[0])
    assert not torch.equal(a.allowed_mask(), b.allowed_mask())


# ---------------------------------------------------------------- the masker

def test_masker_records_timings_and_its_eos(tok, masker):
    assert masker.eos_token_ids == EOS_IDS and masker.vocab_size == 512
    assert masker.timings.tokenizer_s > 0 and masker.timings.warmup_s > 0
    plain = C.TokenMasker(tok)                                   # the tokenizer's own eos only
    assert plain.eos_token_ids == (tok.eos_token_id,)


def test_compiled_grammars_are_an_lru(tok):
    mk = C.TokenMasker(tok, cache_size=2)
    base = mk.compiles
    gs = [S.grammar_for(schema_format({"type": "integer", "maximum": n}), None, None) for n in range(3)]
    mk.matcher(gs[0]), mk.matcher(gs[1]), mk.matcher(gs[0])
    assert mk.compiles == base + 2
    mk.matcher(gs[2])                     # evicts gs[1], the least recently used
    mk.matcher(gs[0])
    assert mk.compiles == base + 3
    mk.matcher(gs[1])
    assert mk.compiles == base + 4
    with pytest.raises(ValueError, match="cache_size must be >= 1"):
        C.TokenMasker(tok, cache_size=0)


def test_a_grammar_that_does_not_compile_raises(masker):
    with pytest.raises(ValueError, match="grammar does not compile"):
        masker.matcher('{"grammars": [{"json_schema": {"type": "foo"}}]}')


def test_matcher_is_safe_from_many_threads_and_compiles_once(tok):
    mk = C.TokenMasker(tok)
    assert mk.compiles == 1                               # the warm-up: any JSON object
    mk.matcher(S.grammar_for({"type": "json_object"}, None, None))
    assert mk.compiles == 2                               # the edge's json_object adds its whitespace rule
    mk.matcher(S.grammar_for({"type": "json_object"}, None, None))
    assert mk.compiles == 2                               # then cached
    g = S.grammar_for(None, TOOLS, "required")
    with ThreadPoolExecutor(8) as ex:
        masks = list(ex.map(lambda _: mk.matcher(g).allowed_mask(), range(32)))
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert mk.compiles == 3                               # a burst of one grammar compiles it once
    with ThreadPoolExecutor(4) as ex:                     # and a bad one fails every waiter
        errors = list(ex.map(lambda _: pytest.raises(ValueError, mk.matcher, '{"grammars": 1}'), range(4)))
    assert all("grammar does not compile" in str(e.value) for e in errors)


def test_unpack_bitmask_matches_bit_by_bit():
    words = torch.tensor([[0b1011, -1, -(1 << 31) + 1], [0, 0, 0]], dtype=torch.int32).view(2, 3)
    got = C.unpack_bitmask(words, width=100, vocab_size=70)
    want = torch.zeros(2, 100, dtype=torch.bool)
    for r in range(2):
        for t in range(70):
            want[r, t] = bool((int(words[r, t // 32]) >> (t % 32)) & 1)
    assert torch.equal(got, want) and not got[:, 70:].any()
    assert torch.equal(C.unpack_bitmask(words, width=50, vocab_size=96), want[:, :50])


def mixed_rows(masker, tok):
    """Three matchers at different places in different grammars."""
    ms = [masker.matcher(S.grammar_for({"type": "json_object"}, None, None)),
          masker.matcher(S.grammar_for(None, TOOLS, "required")),
          masker.matcher(S.grammar_for(schema_format({"type": "integer"}), None, None))]
    for m, text in zip(ms, ['{"a', '{"name": "add", "arguments": {"a": 1', "4"]):
        assert all(m.consume(t) for t in tok.encode(text, add_special_tokens=False))
    return ms


@pytest.mark.parametrize("width", [512, 640])          # tokenizer vocab, and a model padded beyond it
def test_mask_logits_masks_constrained_rows_and_leaves_the_rest(masker, tok, width):
    a, b, c = mixed_rows(masker, tok)
    torch.manual_seed(0)
    logits = torch.randn(5, width)
    before = logits.clone()
    rows = [a, None, b, None, c]
    bitmask = masker.allocate_bitmask(8)                 # more rows than the batch: fine
    masker.mask_logits_(logits, rows, bitmask)
    for i, m in enumerate(rows):
        if m is None:
            assert torch.equal(logits[i], before[i])     # untouched, padding included
            continue
        allowed = torch.zeros(width, dtype=torch.bool)
        allowed[:masker.vocab_size] = m.allowed_mask()
        assert torch.equal(torch.isfinite(logits[i]), allowed)
        assert torch.equal(logits[i][allowed], before[i][allowed])
        assert torch.isneginf(logits[i][~allowed]).all()


def test_mask_logits_all_rows_one_row_and_none(masker, tok):
    ms = mixed_rows(masker, tok)
    logits = torch.randn(3, 512)
    masker.mask_logits_(logits, ms)                      # all constrained, bitmask allocated here
    for i, m in enumerate(ms):
        assert torch.equal(torch.isfinite(logits[i]), m.allowed_mask())
    one = torch.randn(1, 512)
    masker.mask_logits_(one, [ms[2]], masker.allocate_bitmask(1))
    assert torch.equal(torch.isfinite(one[0]), ms[2].allowed_mask())
    free = torch.randn(2, 512)
    kept = free.clone()
    masker.mask_logits_(free, [None, None])
    assert torch.equal(free, kept)


def test_parallel_fill_equals_one_by_one(masker, tok):
    g = S.grammar_for(None, TOOLS, "required")
    texts = ['{"name": "', '{"name": "add", "arg', '{"name": "get_weather", "arguments": {"city": "P', "{"]
    ms = []
    for t in texts:
        m = masker.matcher(g)
        assert all(m.consume(x) for x in tok.encode(t, add_special_tokens=False))
        ms.append(m)
    batched = torch.zeros(len(ms), 600)
    masker.mask_logits_(batched, ms, masker.allocate_bitmask(len(ms)))
    for i, m in enumerate(ms):
        single = torch.zeros(1, 600)
        masker.mask_logits_(single, [m])
        assert torch.equal(batched[i], single[0])


def test_fill_on_a_worker_thread_while_torch_runs(masker, tok):
    """The step loop may fill masks on a worker thread while the forward pass runs: llguidance
    drops the GIL while filling, and distinct matchers are independent."""
    ms = mixed_rows(masker, tok)
    serial = torch.zeros(3, 512)
    masker.mask_logits_(serial, ms)
    x = torch.randn(512, 512)
    result = {}

    def fill():
        out = torch.zeros(3, 512)
        for _ in range(50):
            out.zero_()
            masker.mask_logits_(out, ms)
        result["masks"] = out

    t = threading.Thread(target=fill)
    t.start()
    for _ in range(20):
        x = torch.tanh(x @ x)                            # "the forward pass"
    t.join()
    assert torch.equal(result["masks"], serial)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_logits_on_cuda_equals_cpu(masker, tok):
    ms = mixed_rows(masker, tok)
    logits = torch.randn(4, 640)
    on_gpu = logits.cuda()
    rows = [ms[0], None, ms[1], ms[2]]
    masker.mask_logits_(logits, rows)
    masker.mask_logits_(on_gpu, rows)
    assert torch.equal(on_gpu.cpu(), logits)
